"""Expert parallel 2 with FSDP 2, and with HSDP 2 × 2 (4 gloo ranks each), trains like one
process on the tiny qwen3-MoE.

ep 2 × dp_shard 4: every rank reads 1 of the 4 sequences of the global batch; the
non-expert parameters are sharded over the 4 ranks, each rank holds 4 of the 8 experts
of every layer and shares them with one other rank (``efsdp`` 2). An expert's gradient
on one rank sums the tokens of its ep group (the all-to-all brought them there); FSDP
divides it by all 4 data-parallel ranks, so it is the mean over the global batch like
every other gradient. The per-parameter check compares every gradient of the first
step, full tensors gathered, with one process's.

Gradient norms match within the loss bound (the core accumulates them in float64);
expert gradients at half their size moved the norm by 4.6e-3 at ep 2.
"""
from __future__ import annotations

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
from plait.testing import run_ranks

pytest.importorskip("plait_fsdp")
pytest.importorskip("plait_ep")
pytest.importorskip("plait_qwen3")

STEPS = 5
TOLERANCE = 1e-5
GRAD_TOLERANCE = 1e-6
GLOBAL_BATCH = 4
WORLD_SIZE = 4
EP_FSDP = ["--plugins", "ep,fsdp", "--parallelism.dp_shard", "4", "--parallelism.ep", "2"]


def job(dump, *extra, local_batch_size):
    # per sequence: the same balance-loss mean however the batch is split
    return parity_job(dump, "qwen3_moe_debugmodel", "--moe.aux_loss_type", "sequence", *extra,
                      local_batch_size=local_batch_size, steps=STEPS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return train_in_this_process(job(tmp_path_factory.mktemp("single"), local_batch_size=GLOBAL_BATCH))


@pytest.mark.parametrize(
    "degrees",
    [
        pytest.param(EP_FSDP, id="ep2-fsdp4"),
        pytest.param(["--plugins", "ep,fsdp", "--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "2",
                      "--parallelism.ep", "2"], id="ep2-hsdp2x2"),
    ],
)
def test_expert_parallel_layout_matches_single_process(tmp_path, reference, degrees):
    run = run_ranks(WORLD_SIZE, job(tmp_path, *degrees, local_batch_size=GLOBAL_BATCH // WORLD_SIZE),
                    tmp_path / "result.json")
    loss_diff, norm_diff = max_differences(run, reference)
    print(f"max |Δloss| {loss_diff:.2e}  max |Δgrad_norm| {norm_diff:.2e}")
    assert loss_diff < TOLERANCE and norm_diff < TOLERANCE, (loss_diff, norm_diff, run, reference)


def test_expert_gradients_are_the_single_process_mean(tmp_path: Path):
    expected = keep_determinism_setting(
        lambda: first_step_gradients(job(tmp_path / "single", local_batch_size=GLOBAL_BATCH))
    )
    argv = job(tmp_path / "ep", *EP_FSDP, local_batch_size=GLOBAL_BATCH // WORLD_SIZE)
    gradients = distributed_first_step_gradients(WORLD_SIZE, argv, tmp_path)

    assert sorted(gradients) == sorted(expected)
    assert any(".moe.experts." in name for name in gradients)
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, expected[name], rtol=0, atol=GRAD_TOLERANCE, msg=name)
