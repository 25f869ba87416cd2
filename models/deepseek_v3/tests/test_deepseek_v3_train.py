"""A short training run of the debug flavor through ``plait train``: the loss falls and the
recipe's expert-bias balancing moves the biases."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from plait.cli import train
from plait.testing import short_job

STEPS = 12


def _expert_biases(checkpoint: Path) -> list[torch.Tensor]:
    from plait.checkpoint import load_model_state
    from plait_deepseek_v3.spec import FLAVORS, deepseek_v3_spec

    model = deepseek_v3_spec().build_meta(FLAVORS["debugmodel"])
    model.to_empty(device="cpu")
    state_dict = model.state_dict()
    load_model_state(str(checkpoint), state_dict)
    return [state_dict[f"layers.{i}.moe.expert_bias"] for i in (1, 2, 3)]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_debugmodel_trains_and_balances_its_experts(tmp_path: Path) -> None:
    result = train(short_job("deepseek_v3_debugmodel", tmp_path, "--lr_scheduler.warmup_steps", "2", steps=STEPS,
                             lr=3e-3, local_batch_size=4, checkpoint_interval=STEPS))  # fmt: skip

    losses = result.losses
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = [losses[s] for s in (1, 2, 3)], [losses[s] for s in (STEPS - 2, STEPS - 1, STEPS)]
    assert sum(last) / 3 < sum(first) / 3 - 0.5, losses
    for bias in _expert_biases(tmp_path / "checkpoint" / f"step-{STEPS}"):
        steps_moved = bias / 1e-3  # the recipe's rate: each step moves every bias by -1, 0 or +1 times it
        torch.testing.assert_close(steps_moved, steps_moved.round(), rtol=0, atol=1e-3)
        assert 1 <= steps_moved.abs().max() <= STEPS + 1e-3
