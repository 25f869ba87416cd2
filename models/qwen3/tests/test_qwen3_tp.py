"""Tensor parallelism: the dense model, with the per-head q/k norms that
``plait_qwen3.tensor_parallel`` prepares, and the MoE model, whose experts' hidden
features the tp plugin splits: two tp ranks train like one process."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("plait_tp", reason="needs the tp plugin (plait-tp)")

from plait.testing import assert_losses_match, losses_resumed_in_parallel, short_job

STEPS = 5  # the tp run resumes from the single run's step-1 checkpoint and trains 4 steps
TP2 = ["--plugins", "tp", "--parallelism.tp", "2", "--parallelism.dp_shard", "1", "--job.pg_timeout_seconds", "90"]


@pytest.mark.parametrize(
    ("recipe", "options"),
    [
        pytest.param("qwen3_debugmodel", [], id="dense"),
        pytest.param("qwen3_moe_debugmodel", [], id="moe"),
        pytest.param("qwen3_moe_debugmodel", ["--tp.sequence_parallel", "False", "--tp.loss_parallel", "False"],
                     id="moe-no-sp"),
    ],
)
def test_two_tp_ranks_match_one_process(tmp_path: Path, recipe: str, options: list[str]) -> None:
    def job(dump: Path) -> list[str]:
        # lr large enough that unsummed q/k-norm gradients show (gap 1e-4 at step 3)
        return short_job(recipe, dump, steps=STEPS, lr=2e-2, checkpoint_interval=1)

    single, tp_losses = losses_resumed_in_parallel(tmp_path, job, [*TP2, *options], ranks=2)
    assert_losses_match(single, tp_losses, first_step=2, steps=STEPS)
