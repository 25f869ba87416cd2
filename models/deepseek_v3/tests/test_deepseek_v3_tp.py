"""Tensor parallelism of DeepSeek-V3: latent attention (heads split, latent projections
replicated, the shared rotary key's gradient summed) and MoE blocks (every expert's
hidden features split): two tp ranks train like one process."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("plait_tp", reason="needs the tp plugin (plait-tp)")

from plait.testing import assert_losses_match, losses_resumed_in_parallel, short_job

STEPS = 5  # the tp run resumes from the single run's step-1 checkpoint and trains 4 steps
TP2 = ["--plugins", "tp", "--parallelism.tp", "2", "--parallelism.dp_shard", "1", "--job.pg_timeout_seconds", "90"]


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
    def job(dump: Path) -> list[str]:
        # lr large enough that a wrong gradient shows within the steps
        return short_job("deepseek_v3_debugmodel", dump, "--model.flavor", flavor, steps=STEPS, lr=1e-2,
                         checkpoint_interval=1)  # fmt: skip

    single, tp_losses = losses_resumed_in_parallel(tmp_path, job, [*TP2, *options], ranks=2)
    assert_losses_match(single, tp_losses, first_step=2, steps=STEPS)
    assert tp_losses[STEPS] < tp_losses[2]  # it trains
