"""Tensor parallelism of DeepSeek-V3: latent attention (heads split, latent projections
replicated, the shared rotary key's gradient summed) and MoE blocks (every expert's
hidden features split): two tp ranks train like one process."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("plait_tp", reason="needs the tp plugin (plait-tp)")

from plait.testing import losses_resumed_in_parallel

STEPS = 5  # the tp run resumes from the single run's step-1 checkpoint and trains 4 steps
TP2 = ["--plugins", "tp", "--parallelism.tp", "2", "--parallelism.dp_shard", "1", "--job.pg_timeout_seconds", "90"]


def _job(flavor: str):
    def argv(dump: Path) -> list[str]:
        return [
            "--config", "deepseek_v3_debugmodel",
            "--model.flavor", flavor,
            "--training.steps", str(STEPS),
            "--training.seq_len", "64",
            "--training.local_batch_size", "2",
            "--optimizer.lr", "1e-2",  # large enough that a wrong gradient shows within the steps
            "--checkpoint.interval", "1",
            "--checkpoint.keep_latest_k", "0",
            "--metrics.progress", "off",
            "--job.dump_folder", str(dump),
        ]  # fmt: skip

    return argv


@pytest.mark.parametrize(
    ("flavor", "options"),
    [
        pytest.param("debugmodel", [], id="plain-query"),
        pytest.param("debugmodel_q_lora", [], id="low-rank-query"),
        pytest.param("debugmodel_q_lora", ["--tp.sequence_parallel", "False", "--tp.loss_parallel", "False"],
                     id="low-rank-query-no-sp"),
    ],
)
def test_two_tp_ranks_match_one_process(tmp_path: Path, flavor: str, options: list[str]) -> None:
    single, tp_losses = losses_resumed_in_parallel(tmp_path, _job(flavor), [*TP2, *options], ranks=2)

    assert sorted(tp_losses) == list(range(2, STEPS + 1))
    for step in range(2, STEPS + 1):
        assert tp_losses[step] == pytest.approx(single[step], abs=1e-5), (step, tp_losses, single)
    assert tp_losses[STEPS] < tp_losses[2]  # it trains
