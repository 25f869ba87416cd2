"""qwen3 under context parallelism trains like one process.

The qwen3 spec declares its cp support: ``sdpa`` attention modules (``layers.*.attention.sdpa``)
that the context-parallel plugin replaces with ring attention, and the ``rope_cache``
buffer, sharded on the sequence like the tokens. Its per-head q/k norms act on each
token alone, so they need nothing from the other cp rank.

- cp 2 (2 gloo ranks): both ranks read the same 4 sequences and each takes its head-tail
  half of every sequence; FSDP shards the parameters over the 2 ranks.
- cp 2 × FSDP 2 (4 gloo ranks): two data-parallel groups read 2 sequences each, the two
  cp ranks of a group split them; FSDP shards the parameters over dp_shard × cp.
- qwen3-MoE, cp 2 × ep 2 (2 gloo ranks): expert parallelism borrows the cp ranks, so each
  rank holds 4 of the 8 experts and the all-to-all exchanges the tokens of the two
  halves of every sequence. The sequence-wise balance loss sums its token counts and
  score sums over the cp ranks (taken over each rank's half sequences instead, the loss
  was 1.2e-4 off after 5 steps).

Losses and gradient norms must match a single process on the whole batch within 1e-5.
"""
from __future__ import annotations

import pytest

from parity_helpers import max_differences, parity_job, train_in_this_process
from plait.testing import run_ranks

pytest.importorskip("plait_fsdp")
pytest.importorskip("plait_context_parallel")
pytest.importorskip("plait_qwen3")

STEPS = 5
TOLERANCE = 1e-5
GLOBAL_BATCH = 4


def job(dump, *extra, local_batch_size, config="qwen3_debugmodel"):
    return parity_job(dump, config, *extra, local_batch_size=local_batch_size, steps=STEPS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    result = train_in_this_process(job(tmp_path_factory.mktemp("single"), local_batch_size=GLOBAL_BATCH))
    assert sorted(result["losses"]) == list(range(1, STEPS + 1))
    return result


@pytest.mark.parametrize(
    ("ranks", "degrees", "local_batch_size"),
    [
        pytest.param(2, [], GLOBAL_BATCH, id="cp2"),
        pytest.param(4, ["--parallelism.dp_shard", "2"], GLOBAL_BATCH // 2, id="cp2xfsdp2"),
    ],
)
def test_qwen3_under_context_parallel_matches_one_process(tmp_path, reference, ranks, degrees, local_batch_size):
    argv = job(tmp_path, "--plugins", "context-parallel,fsdp", "--parallelism.cp", "2", *degrees,
               local_batch_size=local_batch_size)
    run = run_ranks(ranks, argv, tmp_path / "result.json")
    loss_diff, norm_diff = max_differences(run, reference)
    print(f"max |Δloss| {loss_diff:.2e}  max |Δgrad_norm| {norm_diff:.2e}")
    assert loss_diff < TOLERANCE and norm_diff < TOLERANCE, (loss_diff, norm_diff, run, reference)


MOE = ["--moe.aux_loss_coeff", "0.01", "--moe.aux_loss_type", "sequence"]  # large enough to matter


def test_qwen3_moe_under_context_and_expert_parallel_matches_one_process(tmp_path):
    pytest.importorskip("plait_ep")
    reference = train_in_this_process(
        job(tmp_path / "single", *MOE, local_batch_size=GLOBAL_BATCH, config="qwen3_moe_debugmodel")
    )
    argv = job(tmp_path / "cp-ep", *MOE, "--plugins", "context-parallel,ep,fsdp", "--parallelism.cp", "2",
               "--parallelism.ep", "2", local_batch_size=GLOBAL_BATCH, config="qwen3_moe_debugmodel")
    run = run_ranks(2, argv, tmp_path / "result.json")
    loss_diff, norm_diff = max_differences(run, reference)
    print(f"max |Δloss| {loss_diff:.2e}  max |Δgrad_norm| {norm_diff:.2e}")
    assert loss_diff < TOLERANCE and norm_diff < TOLERANCE, (loss_diff, norm_diff, run, reference)
