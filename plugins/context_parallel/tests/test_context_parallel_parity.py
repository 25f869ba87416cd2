"""Context parallelism over 2 gloo ranks trains exactly like one process.

Both cp ranks read the same 4 sequences of 64 tokens and each takes its head-tail half of
every sequence; FSDP shards the parameters over the two ranks (dp_shard × cp) and
averages their gradients. Losses and gradient norms must match a single process that
trains on the whole batch. ``--training.deterministic`` makes the initial weights
independent of the layout.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from plait.testing import max_differences, run_ranks, train_in_this_process

STEPS = 6
TOLERANCE = 1e-5
BATCH = 4


def job(dump_folder: Path, *extra: str, local_batch_size: int = BATCH) -> list[str]:
    return [
        "--config", "llama3_debugmodel",
        "--model.flavor", "debugmodel_tiny",
        "--training.steps", str(STEPS),
        "--training.seq_len", "64",
        "--training.local_batch_size", str(local_batch_size),
        "--training.deterministic", "True",
        "--lr_scheduler.warmup_steps", "2",
        "--checkpoint.enable", "False",
        "--metrics.progress", "off",
        "--job.pg_timeout_seconds", "90",
        "--job.dump_folder", str(dump_folder),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, dict[int, float]]:
    """One process, the whole batch at once."""
    result = train_in_this_process(job(tmp_path_factory.mktemp("single")))
    assert sorted(result["losses"]) == list(range(1, STEPS + 1))
    return result


@pytest.mark.parametrize(
    ("extra", "local_batch_size"),
    [
        pytest.param([], BATCH, id="cp2"),
        pytest.param(
            ["--context_parallel.rotate_method", "alltoall", "--training.global_batch_size", str(BATCH),
             "--activation_checkpoint.mode", "full"],
            BATCH // 2,
            id="cp2-alltoall-grad-accumulation-full-ac",
        ),
    ],
)
def test_two_cp_ranks_match_one_process(tmp_path, reference, extra, local_batch_size):
    argv = job(tmp_path, "--plugins", "context-parallel,fsdp", "--parallelism.cp", "2", *extra,
               local_batch_size=local_batch_size)
    run = run_ranks(2, argv, tmp_path / "result.json")
    loss_diff, norm_diff = max_differences(run, reference)
    print(f"max |Δloss| {loss_diff:.2e}  max |Δgrad_norm| {norm_diff:.2e}")
    assert loss_diff < TOLERANCE and norm_diff < TOLERANCE, (loss_diff, norm_diff, run, reference)
