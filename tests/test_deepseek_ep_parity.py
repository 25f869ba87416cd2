"""Expert parallelism trains the tiny DeepSeek-V3 like one process on the same global batch.

The ``deepseek_v3_debugmodel`` recipe: one dense block, then three MoE blocks of 8 sigmoid-
routed experts (top 3 of 2 of 4 groups) plus a shared expert, balanced by the expert bias
(moved after every step from the all-reduced loads) and a sequence-wise balance loss.

- ep 2 (2 gloo ranks, ``dp_shard`` 2): each rank reads 2 of the 4 sequences and holds 4 of
  the 8 experts of every MoE layer; a checkpoint saved there (step 4) resumes in one
  process and continues like the one-process run.
- ep 2 × FSDP 4 (4 gloo ranks): each rank reads 1 sequence; the non-expert parameters are
  sharded over the 4 ranks, the expert slices over ``efsdp`` 2. Every first-step gradient,
  full tensors gathered, must equal one process's.

Losses and gradient norms (accumulated in float64 by the core) must match within 1e-5.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from parity_helpers import (
    distributed_first_step_gradients,
    first_step_gradients,
    keep_determinism_setting,
    max_differences,
    parity_job,
    train_in_this_process,
)
from plait.checkpoint import list_checkpoints
from plait.testing import run_ranks

pytest.importorskip("plait_fsdp")
pytest.importorskip("plait_ep")
pytest.importorskip("plait_deepseek_v3")

STEPS = 6
CHECKPOINT_INTERVAL = 4
TOLERANCE = 1e-5
GRAD_TOLERANCE = 1e-6
GLOBAL_BATCH = 4
EP2 = ["--plugins", "ep,fsdp", "--parallelism.dp_shard", "2", "--parallelism.ep", "2"]
EP2_FSDP4 = ["--plugins", "ep,fsdp", "--parallelism.dp_shard", "4", "--parallelism.ep", "2"]


def job(dump: Path, *extra: str, local_batch_size: int, checkpoint_interval: int = 0) -> list[str]:
    return parity_job(dump, "deepseek_v3_debugmodel", *extra, local_batch_size=local_batch_size, steps=STEPS,
                      checkpoint_interval=checkpoint_interval)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, dict[int, float]]:
    """One process, the whole global batch at once."""
    result = train_in_this_process(job(tmp_path_factory.mktemp("single"), local_batch_size=GLOBAL_BATCH))
    assert sorted(result["losses"]) == list(range(1, STEPS + 1))
    return result


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory) -> tuple[Path, dict[str, dict[int, float]]]:
    folder = tmp_path_factory.mktemp("ep2")
    argv = job(folder, *EP2, local_batch_size=GLOBAL_BATCH // 2, checkpoint_interval=CHECKPOINT_INTERVAL)
    return folder, run_ranks(2, argv, folder / "result.json")


def test_ep2_matches_single_process(ep2_run, reference):
    loss_diff, norm_diff = max_differences(ep2_run[1], reference)
    print(f"ep2: max |Δloss| {loss_diff:.2e}  max |Δgrad_norm| {norm_diff:.2e}")
    assert loss_diff < TOLERANCE and norm_diff < TOLERANCE, (loss_diff, norm_diff, ep2_run[1], reference)


def test_ep2_fsdp4_matches_single_process(tmp_path, reference):
    run = run_ranks(4, job(tmp_path, *EP2_FSDP4, local_batch_size=GLOBAL_BATCH // 4), tmp_path / "result.json")
    loss_diff, norm_diff = max_differences(run, reference)
    print(f"ep2 x fsdp4: max |Δloss| {loss_diff:.2e}  max |Δgrad_norm| {norm_diff:.2e}")
    assert loss_diff < TOLERANCE and norm_diff < TOLERANCE, (loss_diff, norm_diff, run, reference)


def test_ep2_checkpoint_resumes_in_a_single_process(ep2_run, reference):
    dump_folder, sharded = ep2_run
    folder = dump_folder / "checkpoint"
    assert list_checkpoints(str(folder)) == [CHECKPOINT_INTERVAL, STEPS]
    shutil.rmtree(folder / f"step-{STEPS}")  # resume from step 4, saved with 4 experts per rank

    resumed = train_in_this_process(
        job(dump_folder, local_batch_size=GLOBAL_BATCH, checkpoint_interval=CHECKPOINT_INTERVAL)
    )
    assert sorted(resumed["losses"]) == list(range(CHECKPOINT_INTERVAL + 1, STEPS + 1))
    for step in resumed["losses"]:
        assert abs(resumed["losses"][step] - sharded["losses"][step]) < TOLERANCE
        assert abs(resumed["losses"][step] - reference["losses"][step]) < TOLERANCE
        assert abs(resumed["grad_norms"][step] - reference["grad_norms"][step]) < TOLERANCE


def test_ep2_fsdp4_gradients_are_the_single_process_mean(tmp_path: Path):
    expected = keep_determinism_setting(
        lambda: first_step_gradients(job(tmp_path / "single", local_batch_size=GLOBAL_BATCH))
    )
    gradients = distributed_first_step_gradients(
        4, job(tmp_path / "ep", *EP2_FSDP4, local_batch_size=GLOBAL_BATCH // 4), tmp_path
    )
    assert sorted(gradients) == sorted(expected)
    assert any(".moe.experts." in name for name in gradients)
    assert any(".moe.shared_experts." in name for name in gradients)
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, expected[name], rtol=0, atol=GRAD_TOLERANCE, msg=name)
