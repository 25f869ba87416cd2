"""Context parallel 2 with FSDP 2, and with TP 2 (4 gloo ranks each), trains exactly like
one process.

cp 2 × dp_shard 2: FSDP shards the parameters over dp_shard × cp (4 ranks) and averages
the gradients over them; the two data-parallel groups read 2 sequences each, and the two
cp ranks of a group take head-tail halves of those sequences. The loss is the mean over
dp × cp of each rank's local mean, which equals the global mean because every shard has
as many tokens. cp 2 × tp 2: all ranks read the same 4 sequences; within a cp shard,
tensor parallelism splits the heads (and sequence parallelism the norms).
"""
from __future__ import annotations

import pytest

from plait.cli import train
from plait.testing import keep_determinism_setting, run_ranks

pytest.importorskip("plait_fsdp")
pytest.importorskip("plait_context_parallel")

STEPS = 6
TOLERANCE = 1e-5


def job(dump, *extra, local_batch_size):
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
        "--job.dump_folder", str(dump),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return keep_determinism_setting(lambda: train(job(tmp_path_factory.mktemp("single"), local_batch_size=4)))


@pytest.mark.parametrize(
    ("plugins", "degrees", "local_batch_size"),
    [
        pytest.param("context-parallel,fsdp", ["--parallelism.dp_shard", "2"], 2, id="cp2xfsdp2"),
        pytest.param("context-parallel,fsdp,tp", ["--parallelism.dp_shard", "1", "--parallelism.tp", "2"], 4,
                     id="cp2xtp2"),
    ],
)
def test_cp2_with_a_second_degree_matches_one_process(tmp_path, reference, plugins, degrees, local_batch_size):
    if "tp" in plugins.split(","):
        pytest.importorskip("plait_tp")
    argv = job(tmp_path, "--plugins", plugins, "--parallelism.cp", "2", *degrees, local_batch_size=local_batch_size)
    run = run_ranks(4, argv, tmp_path / "result.json")
    assert sorted(run["losses"]) == list(range(1, STEPS + 1))
    loss_diff = max(abs(run["losses"][s] - reference.losses[s]) for s in reference.losses)
    norm_diff = max(abs(run["grad_norms"][s] - reference.grad_norms[s]) for s in reference.grad_norms)
    print(f"max |Δloss| {loss_diff:.2e}  max |Δgrad_norm| {norm_diff:.2e}")
    assert loss_diff < TOLERANCE and norm_diff < TOLERANCE, (loss_diff, norm_diff, run["losses"], reference.losses)
