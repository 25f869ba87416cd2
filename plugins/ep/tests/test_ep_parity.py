"""Expert parallelism trains like one process on the same global batch.

Two gloo ranks (``--parallelism.dp_shard 2 --parallelism.ep 2``) each read half of the
global batch of 4 sequences and hold 4 of the 8 experts of every MoE layer of the tiny
qwen3-MoE; the losses must match a single process with local batch 4, and a checkpoint
saved by the two ranks must resume in one process.

Gradient norms match within the same bound (the core accumulates them in float64).
Expert gradients at half their size (a wrong divide factor) moved the norm by 4.6e-3; the
exact per-parameter comparison is in tests/test_ep_fsdp.py.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from plait.checkpoint import list_checkpoints
from plait.cli import train
from plait.testing import keep_determinism_setting, max_differences, run_ranks, train_in_this_process

STEPS = 6
TOLERANCE = 1e-5
GLOBAL_BATCH = 4


def job(dump_folder: Path, *extra: str, local_batch_size: int) -> list[str]:
    return [
        "--config", "qwen3_moe_debugmodel",
        "--moe.aux_loss_type", "sequence",  # per sequence: the same mean however the batch is split
        "--training.steps", str(STEPS),
        "--training.seq_len", "64",
        "--training.local_batch_size", str(local_batch_size),
        "--training.deterministic", "True",
        "--lr_scheduler.warmup_steps", "2",
        "--checkpoint.interval", "4",
        "--metrics.progress", "off",
        "--job.pg_timeout_seconds", "90",
        "--job.dump_folder", str(dump_folder),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, dict[int, float]]:
    """One process, the whole global batch at once."""
    result = train_in_this_process(job(tmp_path_factory.mktemp("single"), local_batch_size=GLOBAL_BATCH))
    assert sorted(result["losses"]) == list(range(1, STEPS + 1))
    return result


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory) -> tuple[Path, dict[str, dict[int, float]]]:
    folder = tmp_path_factory.mktemp("ep2")
    argv = job(folder, "--plugins", "ep,fsdp", "--parallelism.dp_shard", "2", "--parallelism.ep", "2",
               local_batch_size=GLOBAL_BATCH // 2)
    return folder, run_ranks(2, argv, folder / "result.json")


def test_ep2_matches_single_process(ep2_run, reference):
    loss_diff, norm_diff = max_differences(ep2_run[1], reference)
    assert loss_diff < TOLERANCE and norm_diff < TOLERANCE, (loss_diff, norm_diff, ep2_run[1], reference)


def test_ep2_checkpoint_resumes_in_a_single_process(ep2_run, reference):
    dump_folder, sharded = ep2_run
    folder = dump_folder / "checkpoint"
    assert list_checkpoints(str(folder)) == [4, STEPS]
    shutil.rmtree(folder / f"step-{STEPS}")  # resume from step 4, saved with 4 experts per rank

    resumed = keep_determinism_setting(lambda: train(job(dump_folder, local_batch_size=GLOBAL_BATCH)))
    assert sorted(resumed.losses) == [5, STEPS]
    for step in (5, STEPS):
        assert abs(resumed.losses[step] - sharded["losses"][step]) < TOLERANCE
        assert abs(resumed.losses[step] - reference["losses"][step]) < TOLERANCE


@pytest.mark.parametrize(
    "compiled", [pytest.param([], id="eager"), pytest.param(["--compile.enable", "True"], id="compiled")]
)
def test_ep2_with_selective_op_checkpointing_matches_single_process(tmp_path, reference, compiled):
    """The expert slices' FSDP unit gathers its parameters again inside the recompute:
    per-op selective checkpointing replays only the saved operators by position."""
    argv = job(tmp_path, "--plugins", "ep,fsdp", "--parallelism.dp_shard", "2", "--parallelism.ep", "2",
               "--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_option", "op",
               "--checkpoint.enable", "False", "--job.pg_timeout_seconds", "180", *compiled,
               local_batch_size=GLOBAL_BATCH // 2)
    run = run_ranks(2, argv, tmp_path / "result.json")
    loss_diff, norm_diff = max_differences(run, reference)
    assert loss_diff < TOLERANCE and norm_diff < TOLERANCE, (loss_diff, norm_diff, run, reference)
