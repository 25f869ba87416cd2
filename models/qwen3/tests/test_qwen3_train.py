"""Short training runs of both debug flavors through ``plait train``."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from plait.cli import train
from plait.testing import short_job

STEPS = 12


def _job(recipe: str, dump: Path, *extra: str) -> list[str]:
    return short_job(recipe, dump, "--lr_scheduler.warmup_steps", "2", *extra, steps=STEPS, lr=3e-3,
                     local_batch_size=4, checkpoint_interval=STEPS)  # fmt: skip


def _falls(losses: dict[int, float]) -> bool:
    first, last = [losses[s] for s in (1, 2, 3)], [losses[s] for s in (STEPS - 2, STEPS - 1, STEPS)]
    return sum(last) / 3 < sum(first) / 3 - 0.5


def test_dense_debugmodel_trains(tmp_path: Path) -> None:
    result = train(_job("qwen3_debugmodel", tmp_path))
    assert sorted(result.losses) == list(range(1, STEPS + 1))
    assert _falls(result.losses), result.losses


def _scalars(tensorboard: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard))
    events.Reload()
    return {tag: [event.value for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _expert_biases(checkpoint: Path) -> list[torch.Tensor]:
    from plait.checkpoint import load_model_state
    from plait_qwen3.spec import FLAVORS, qwen3_spec

    model = qwen3_spec().build_meta(FLAVORS["debugmodel_moe"])
    model.to_empty(device="cpu")
    state_dict = model.state_dict()
    load_model_state(str(checkpoint), state_dict)
    return [state_dict[f"layers.{i}.moe.expert_bias"] for i in range(4)]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_moe_debugmodel_trains_balances_and_logs_routing(tmp_path: Path) -> None:
    """The recipe's balance loss, plus the bias updates asked for on the command line."""
    result = train(_job("qwen3_moe_debugmodel", tmp_path, "--moe.load_balance_coeff", "1e-3"))

    assert _falls(result.losses), result.losses
    scalars = _scalars(tmp_path / "tb")
    for layer in range(4):
        ratios = scalars[f"moe/layer{layer}/max_load_ratio"]
        assert len(ratios) == STEPS and all(1.0 <= r <= 4.0 for r in ratios)  # at most 8 experts / top 2
    assert scalars["moe/max_load_ratio"] == [max(r) for r in zip(*(scalars[f"moe/layer{i}/max_load_ratio"]
                                                                     for i in range(4)))]  # fmt: skip
    assert all(loss >= 1.0 - 1e-6 for loss in scalars["moe/aux_loss"])  # 1 is perfect balance
    for bias in _expert_biases(tmp_path / "checkpoint" / f"step-{STEPS}"):
        steps_moved = bias / 1e-3  # each step moves every bias by -1, 0 or +1 times the rate
        torch.testing.assert_close(steps_moved, steps_moved.round(), rtol=0, atol=1e-3)
        assert steps_moved.abs().max() <= STEPS + 1e-3 and steps_moved.abs().max() >= 1
