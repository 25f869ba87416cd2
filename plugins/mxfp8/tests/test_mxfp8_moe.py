"""MXFP8 grouped experts in training (emulated): a one-layer qwen3 MoE debug model tracks
its float32 run within a stated band, and under expert parallelism (ep 2 over dp_shard 2,
all-to-all dispatch, token groups padded to 32 after the exchange) matches the
one-process MXFP8 run within 1e-5. Each rank's micro-batch is one sequence of 64 tokens,
as each of the one-process run's two accumulated micro-batches."""
from __future__ import annotations

from pathlib import Path

import pytest

from plait.testing import max_differences, run_ranks_in_sequence, train_in_this_process

TOLERANCE = 1e-5
#: |loss(mxfp8) - loss(float32)| at each step (measured: at most 8e-4).
MXFP8_BAND = 5e-3


def job(dump_folder: Path, *extra: str) -> list[str]:
    return [
        "--config", "qwen3_moe_debugmodel",
        "--model.args.n_layers", "1",
        "--moe.aux_loss_type", "sequence",  # per sequence: the same mean however the batch is split
        "--training.steps", "2",
        "--training.seq_len", "64",
        "--training.local_batch_size", "1",
        "--training.global_batch_size", "2",
        "--training.deterministic", "True",
        "--lr_scheduler.warmup_steps", "1",
        "--metrics.progress", "off",
        "--job.pg_timeout_seconds", "120",
        "--job.dump_folder", str(dump_folder),
        *extra,
    ]  # fmt: skip


MXFP8 = ("--mxfp8.emulate", "True")


@pytest.fixture(scope="module")
def mxfp8_run(tmp_path_factory) -> dict[str, dict[int, float]]:
    return train_in_this_process(job(tmp_path_factory.mktemp("mxfp8"), "--plugins", "mxfp8", *MXFP8))


def test_moe_tracks_float32(tmp_path, mxfp8_run):
    reference = train_in_this_process(job(tmp_path))
    loss_diff, _ = max_differences(mxfp8_run, reference)
    assert TOLERANCE < loss_diff < MXFP8_BAND, loss_diff  # MXFP8 is in effect, and close


def test_expert_parallel_matches_one_process(tmp_path, mxfp8_run):
    argv = job(tmp_path, "--plugins", "mxfp8,ep,fsdp", *MXFP8, "--parallelism.dp_shard", "2", "--parallelism.ep", "2")
    (run,) = run_ranks_in_sequence(2, [argv], tmp_path / "result.json", timeout=400)
    loss_diff, norm_diff = max_differences(run, mxfp8_run)
    assert loss_diff < TOLERANCE and norm_diff < TOLERANCE, (loss_diff, norm_diff)
