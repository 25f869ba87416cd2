"""FSDP × TP on a 2-D mesh (4 gloo ranks), HSDP × TP on a 3-D mesh (8 ranks) and FSDP 4 train
like one process, and a checkpoint saved under FSDP 4 resumes under FSDP 2 × TP 2 with the
same losses."""
import shutil

import pytest

from plait.cli import train
from plait.testing import run_ranks

pytest.importorskip("plait_fsdp")
pytest.importorskip("plait_tp")

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
        "--checkpoint.interval", "3",
        "--metrics.progress", "off",
        "--job.pg_timeout_seconds", "90",
        "--job.dump_folder", str(dump),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    result = train(job(tmp_path_factory.mktemp("single"), local_batch_size=4))
    import torch

    torch.use_deterministic_algorithms(False)  # do not leak into other tests of this process
    return result.losses


def assert_close(got, expected, steps):
    for step in steps:
        assert abs(got[step] - expected[step]) < TOLERANCE, (step, got, expected)


def test_fsdp2_x_tp2_matches_one_process(tmp_path, reference):
    argv = job(tmp_path, "--plugins", "fsdp,tp", "--parallelism.dp_shard", "2", "--parallelism.tp", "2",
               local_batch_size=2)
    losses = run_ranks(4, argv, tmp_path / "result.json")["losses"]
    assert_close(losses, reference, range(1, STEPS + 1))


def test_fsdp4_matches_one_process_and_resumes_under_fsdp2_x_tp2(tmp_path, reference):
    first = job(tmp_path / "fsdp4", "--plugins", "fsdp", "--parallelism.dp_shard", "4", local_batch_size=1)
    assert_close(run_ranks(4, first, tmp_path / "first.json")["losses"], reference, range(1, STEPS + 1))
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoint").mkdir(parents=True)
    shutil.copytree(tmp_path / "fsdp4" / "checkpoint" / "step-3", resumed_dir / "checkpoint" / "step-3")
    second = job(resumed_dir, "--plugins", "fsdp,tp", "--parallelism.dp_shard", "2", "--parallelism.tp", "2",
                 local_batch_size=2)
    losses = run_ranks(4, second, tmp_path / "second.json")["losses"]
    assert sorted(losses) == [4, 5, 6]
    assert_close(losses, reference, range(4, STEPS + 1))


def test_hsdp_x_tp_on_a_3d_mesh_matches_one_process(tmp_path, reference):
    """dp_replicate 2 × dp_shard 2 × tp 2: 8 ranks, one sequence each pair of tp ranks."""
    argv = job(tmp_path, "--plugins", "fsdp,tp", "--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "2",
               "--parallelism.tp", "2", local_batch_size=1)
    losses = run_ranks(8, argv, tmp_path / "result.json", timeout=600)["losses"]
    assert_close(losses, reference, range(1, STEPS + 1))
