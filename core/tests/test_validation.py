"""Validation: held-out loss at chosen steps, without touching the training trajectory."""
from __future__ import annotations

import pytest

from plait.config import DataSection, JobConfig
from plait.data.sources import build_source
from plait.errors import ConfigError

from toy_model import ToyModelPlugin, toy_config, train_toy


def validating(folder, *, steps: int = 4, interval: int = 2, **training) -> JobConfig:
    config = toy_config(folder, steps=steps, **training)
    config.data.held_out_share = 0.2
    config.validation.interval = interval
    config.validation.steps = 2
    config.lr_scheduler.decay_ratio = 0.0  # a constant LR: runs of 3 and 5 steps share their first 3
    return config


def test_validation_leaves_the_training_losses_bit_for_bit(tmp_path):
    without = validating(tmp_path / "without", steps=4)
    without.validation.interval = 0
    _, plain = train_toy(without, ToyModelPlugin())
    _, validated = train_toy(validating(tmp_path / "with", steps=4, interval=2), ToyModelPlugin())
    assert validated.losses == plain.losses
    assert sorted(validated.validation_losses) == [2, 4]
    assert all(0 < loss < 20 for loss in validated.validation_losses.values())


def test_a_resumed_run_validates_at_the_same_steps_with_the_same_values(tmp_path):
    _, whole = train_toy(validating(tmp_path / "whole", steps=5, interval=2), ToyModelPlugin())
    assert sorted(whole.validation_losses) == [2, 4, 5]  # every 2 steps and after the last
    _, first = train_toy(validating(tmp_path / "resumed", steps=3, interval=2), ToyModelPlugin())
    _, second = train_toy(validating(tmp_path / "resumed", steps=5, interval=2), ToyModelPlugin())
    assert first.validation_losses[2] == whole.validation_losses[2]
    assert second.validation_losses[4] == whole.validation_losses[4]


def test_held_out_documents_never_reach_training_and_the_split_is_deterministic():
    data = DataSection(held_out_share=0.25)
    whole = build_source(DataSection()).open(None).read(10**9)
    train_side = build_source(data).open(None).read(10**9)
    held_out = build_source(data, held_out=True).open(None).read(10**9)
    assert not set(train_side) & set(held_out)
    assert sorted(train_side + held_out) == sorted(whole)
    assert 0.1 < len(held_out) / len(whole) < 0.4
    assert build_source(data, held_out=True).open(None).read(10**9) == held_out
    assert build_source(data).identity != build_source(data, held_out=True).identity


def test_validation_without_held_out_data_is_a_config_error(tmp_path):
    config = toy_config(tmp_path)
    config.validation.interval = 2
    with pytest.raises(ConfigError, match="--validation.interval 2 needs held-out data: .*--data.held_out_share"):
        config.validate()


@pytest.mark.parametrize(("section", "field", "value", "message"), [
    ("data", "held_out_share", 1.0, "--data.held_out_share must be in"),
    ("validation", "steps", 0, "--validation.steps must be >= 1"),
    ("validation", "interval", -1, "--validation.interval must be >= 0"),
])
def test_bad_validation_options_are_refused(section, field, value, message):
    config = JobConfig()
    setattr(getattr(config, section), field, value)
    with pytest.raises(ConfigError, match=message):
        config.validate()
