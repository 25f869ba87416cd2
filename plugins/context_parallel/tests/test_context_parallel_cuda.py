"""Context parallelism on CUDA/NCCL: 2 GPUs train like one, with torch's own SDPA routes
(the CPU ring-attention routes are not involved). Skipped without 2 GPUs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from plait.cli import train
from plait.testing import keep_determinism_setting, run_ranks

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="context parallelism on CUDA needs 2 GPUs (NCCL); the CPU tests cover the gloo path",
)

STEPS = 6
#: Looser than the CPU tests' 1e-5: the GPU attention kernels accumulate block by block, so
#: ring attention's merged blocks round differently from one kernel call over the sequence.
#: Not yet measured (no GPU machine so far); tighten it after the first GPU run.
TOLERANCE = 1e-4


def job(dump_folder: Path, *extra: str) -> list[str]:
    return [
        "--config", "llama3_debugmodel",
        "--model.flavor", "debugmodel_tiny",
        "--training.steps", str(STEPS),
        "--training.seq_len", "256",
        "--training.local_batch_size", "4",
        "--training.deterministic", "True",
        "--lr_scheduler.warmup_steps", "2",
        "--checkpoint.enable", "False",
        "--metrics.progress", "off",
        "--job.pg_timeout_seconds", "90",
        "--job.dump_folder", str(dump_folder),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return keep_determinism_setting(lambda: train(job(tmp_path_factory.mktemp("single"))))


@pytest.mark.parametrize("rotate_method", ["allgather", "alltoall"])
def test_two_gpus_with_cp_match_one_gpu(tmp_path, reference, rotate_method):
    argv = job(tmp_path, "--plugins", "context-parallel,fsdp", "--parallelism.cp", "2",
               "--context_parallel.rotate_method", rotate_method)
    run = run_ranks(2, argv, tmp_path / "result.json")
    for step in range(1, STEPS + 1):
        assert abs(run["losses"][step] - reference.losses[step]) < TOLERANCE, (step, run, reference.losses)
        assert abs(run["grad_norms"][step] - reference.grad_norms[step]) < TOLERANCE, (step, run, reference.grad_norms)
