"""Every schedule at pp 2 trains exactly like one process on the same batch.

Each layout runs as two real gloo ranks (one subprocess each, torchrun's environment) on
llama3 ``debugmodel_tiny4`` (4 blocks, enough for 2 stages per rank); losses and gradient
norms must match a single process within 1e-5 for every step. Rank 0 reports them: it
holds the first stage, and the loss it reports comes from the last one.
``--training.deterministic`` makes the initial weights independent of the split.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from plait.testing import max_differences, run_ranks, train_in_this_process

STEPS = 5
TOLERANCE = 1e-5
LOCAL_BATCH = 4


def job(dump_folder: Path, *extra: str, local_batch_size: int = LOCAL_BATCH) -> list[str]:
    return [
        "--config", "llama3_debugmodel",
        "--model.flavor", "debugmodel_tiny4",
        "--training.steps", str(STEPS),
        "--training.seq_len", "64",
        "--training.local_batch_size", str(local_batch_size),
        "--training.deterministic", "True",
        "--lr_scheduler.warmup_steps", "2",
        "--checkpoint.enable", "False",
        "--metrics.enable_tensorboard", "False",
        "--metrics.progress", "off",
        "--job.pg_timeout_seconds", "90",
        "--job.dump_folder", str(dump_folder),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, dict[int, float]]:
    """One process, no pipeline, the same 4 sequences per step."""
    result = train_in_this_process(job(tmp_path_factory.mktemp("single")))
    assert sorted(result["losses"]) == list(range(1, STEPS + 1))
    return result


@pytest.mark.parametrize(
    ("schedule", "extra", "local_batch_size"),
    [
        pytest.param("GPipe", ["--pipeline.microbatches", "2"], LOCAL_BATCH, id="GPipe-2-microbatches"),
        pytest.param("1F1B", [], LOCAL_BATCH, id="1F1B"),
        pytest.param(
            "1F1B",
            ["--pipeline.split_points", "layers.1", "--pipeline.microbatches", "2",
             "--training.global_batch_size", str(LOCAL_BATCH)],
            LOCAL_BATCH // 2,
            id="1F1B-uneven-split-grad-accumulation",
        ),
        pytest.param("Interleaved1F1B", [], LOCAL_BATCH, id="Interleaved1F1B"),
        pytest.param("LoopedBFS", ["--pipeline.layers_per_stage", "1"], LOCAL_BATCH, id="LoopedBFS"),
        pytest.param("InterleavedZeroBubble", [], LOCAL_BATCH, id="InterleavedZeroBubble"),
        pytest.param("ZBVZeroBubble", [], LOCAL_BATCH, id="ZBVZeroBubble"),
        pytest.param("DualPipeV", [], LOCAL_BATCH, id="DualPipeV"),
    ],
)  # fmt: skip
def test_pp2_schedule_matches_single_process(tmp_path, reference, schedule, extra, local_batch_size):
    argv = job(
        tmp_path,
        "--plugins", "pipeline",
        "--parallelism.pp", "2",
        "--pipeline.schedule", schedule,
        *extra,
        local_batch_size=local_batch_size,
    )  # fmt: skip
    run = run_ranks(2, argv, tmp_path / "result.json")
    loss_diff, norm_diff = max_differences(run, reference)
    print(f"\n{schedule} {' '.join(extra)}: max |Δloss| {loss_diff:.2e}, max |Δgrad_norm| {norm_diff:.2e}")
    assert loss_diff < TOLERANCE and norm_diff < TOLERANCE, (loss_diff, norm_diff, run, reference)
