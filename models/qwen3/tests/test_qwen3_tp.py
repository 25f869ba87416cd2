"""Tensor parallelism: the dense model, with the per-head q/k norms that
``plait_qwen3.tensor_parallel`` prepares, and the MoE model, whose experts' hidden
features the tp plugin splits: two tp ranks train like one process."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("plait_tp", reason="needs the tp plugin (plait-tp)")

from plait.testing import losses_resumed_in_parallel

STEPS = 5  # the tp run resumes from the single run's step-1 checkpoint and trains 4 steps
TP2 = ["--plugins", "tp", "--parallelism.tp", "2", "--parallelism.dp_shard", "1", "--job.pg_timeout_seconds", "90"]


def _job(recipe: str, *options: str):
    def argv(dump: Path) -> list[str]:
        return [
            "--config", recipe,
            "--training.steps", str(STEPS),
            "--training.seq_len", "64",
            "--training.local_batch_size", "2",
            "--optimizer.lr", "2e-2",  # large enough that unsummed q/k-norm gradients show (gap 1e-4 at step 3)
            "--checkpoint.interval", "1",
            "--checkpoint.keep_latest_k", "0",
            "--metrics.progress", "off",
            "--job.dump_folder", str(dump),
            *options,
        ]  # fmt: skip

    return argv


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
    single, tp_losses = losses_resumed_in_parallel(tmp_path, _job(recipe), [*TP2, *options], ranks=2)

    assert sorted(tp_losses) == list(range(2, STEPS + 1))
    for step in range(2, STEPS + 1):
        assert tp_losses[step] == pytest.approx(single[step], abs=1e-5), (step, tp_losses, single)
