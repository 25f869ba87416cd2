"""Data and tensor parallelism on CUDA/NCCL train like one GPU: the CPU parity tests'
layouts, on GPUs. Each layout is skipped, with its reason, on a machine with fewer GPUs
than it needs; CPU-only machines skip them all."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from plait.cli import train
from plait.testing import keep_determinism_setting, run_ranks

pytest.importorskip("plait_fsdp")
pytest.importorskip("plait_tp")

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = pytest.mark.skipif(GPUS == 0, reason="no CUDA GPU: the gloo tests cover these layouts on CPU")

STEPS = 6
#: fp32 without TF32 (torch's default for matmuls); GPU reductions are ordered differently
#: for each layout, so a bound looser than the CPU tests' 1e-5. Tighten it from measurements.
TOLERANCE = 1e-4
GLOBAL_BATCH = 4

LAYOUTS = {
    "fsdp2": ["--plugins", "fsdp", "--parallelism.dp_shard", "2"],
    "ddp2": ["--plugins", "fsdp", "--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "1"],
    "tp2": ["--plugins", "tp", "--parallelism.tp", "2", "--parallelism.dp_shard", "1"],
    "fsdp4": ["--plugins", "fsdp", "--parallelism.dp_shard", "4"],
    "hsdp2x2": ["--plugins", "fsdp", "--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "2"],
    "fsdp2xtp2": ["--plugins", "fsdp,tp", "--parallelism.dp_shard", "2", "--parallelism.tp", "2"],
    "fsdp2xtp2-bf16": ["--plugins", "fsdp,tp", "--parallelism.dp_shard", "2", "--parallelism.tp", "2",
                       "--training.dtype", "bfloat16"],
}  # fmt: skip
WORLD_SIZES = {"fsdp2": 2, "ddp2": 2, "tp2": 2, "fsdp4": 4, "hsdp2x2": 4, "fsdp2xtp2": 4, "fsdp2xtp2-bf16": 4}


def job(dump_folder: Path, *extra: str, local_batch_size: int) -> list[str]:
    return [
        "--config", "llama3_debugmodel",
        "--model.flavor", "debugmodel",
        "--training.steps", str(STEPS),
        "--training.seq_len", "256",
        "--training.local_batch_size", str(local_batch_size),
        "--training.deterministic", "True",
        "--lr_scheduler.warmup_steps", "2",
        "--checkpoint.enable", "False",
        "--metrics.progress", "off",
        "--job.pg_timeout_seconds", "120",
        "--job.dump_folder", str(dump_folder),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return keep_determinism_setting(
        lambda: train(job(tmp_path_factory.mktemp("one_gpu"), local_batch_size=GLOBAL_BATCH))
    )


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_on_gpus_matches_one_gpu(tmp_path, reference, layout):
    world_size = WORLD_SIZES[layout]
    if GPUS < world_size:
        pytest.skip(f"{layout} needs {world_size} GPUs (NCCL has one rank per GPU); this machine has {GPUS}")
    degrees = LAYOUTS[layout]
    data_parallel = world_size // (2 if "tp2" in layout else 1)
    bf16 = layout.endswith("bf16")
    run = run_ranks(world_size, job(tmp_path, *degrees, local_batch_size=GLOBAL_BATCH // data_parallel),
                    tmp_path / "result.json")
    tolerance = 2e-2 if bf16 else TOLERANCE  # bf16 compute against the fp32 reference
    for step in range(1, STEPS + 1):
        assert abs(run["losses"][step] - reference.losses[step]) < tolerance, (step, run, reference.losses)
        if not bf16:
            assert abs(run["grad_norms"][step] - reference.grad_norms[step]) < tolerance, (step, run)
