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
import torch

from plait.cli import train
from plait.testing import run_ranks

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
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        result = train(job(tmp_path_factory.mktemp("single")))
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    assert sorted(result.losses) == list(range(1, STEPS + 1))
    return {"losses": result.losses, "grad_norms": result.grad_norms}


def max_differences(run: dict[str, dict[int, float]], reference: dict[str, dict[int, float]]) -> tuple[float, float]:
    assert sorted(run["losses"]) == sorted(reference["losses"])
    loss = max(abs(run["losses"][s] - reference["losses"][s]) for s in reference["losses"])
    norm = max(abs(run["grad_norms"][s] - reference["grad_norms"][s]) for s in reference["grad_norms"])
    return loss, norm


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
