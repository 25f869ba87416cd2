"""Pipeline parallelism composed with the other plugins, and checkpoints across layouts.

Every run trains llama3 ``debugmodel_tiny4`` on the same 4 sequences per step as one
process; losses and gradient norms must match that process within 1e-5. Checkpoints
saved by a pipelined run (two stages per rank) must resume in another layout with the
losses the pipelined run itself went on to have, and the other way round.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from plait.checkpoint import list_checkpoints
from plait.testing import run_ranks, train_in_this_process

pytest.importorskip("plait_pipeline")

STEPS = 6
SAVED_STEP = 4
TOLERANCE = 1e-5
GLOBAL_BATCH = 4


def job(dump_folder: Path, *extra: str, local_batch_size: int = GLOBAL_BATCH, steps: int = STEPS) -> list[str]:
    return [
        "--config", "llama3_debugmodel",
        "--model.flavor", "debugmodel_tiny4",
        "--training.steps", str(steps),
        "--training.seq_len", "64",
        "--training.local_batch_size", str(local_batch_size),
        "--training.deterministic", "True",
        "--lr_scheduler.warmup_steps", "2",
        "--checkpoint.interval", str(SAVED_STEP),
        "--metrics.enable_tensorboard", "False",
        "--metrics.progress", "off",
        "--job.pg_timeout_seconds", "90",
        "--job.dump_folder", str(dump_folder),
        *extra,
    ]  # fmt: skip


PP2_INTERLEAVED = ("--plugins", "pipeline", "--parallelism.pp", "2", "--pipeline.schedule", "Interleaved1F1B")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[str, dict[int, float]]]:
    """One process, no parallelism; its checkpoints feed the resume-under-PP test."""
    folder = tmp_path_factory.mktemp("single")
    return folder, train_in_this_process(job(folder))


@pytest.fixture(scope="module")
def pp2_run(tmp_path_factory) -> tuple[Path, dict[str, dict[int, float]]]:
    """PP 2, two stages per rank; its checkpoints feed the resume tests."""
    folder = tmp_path_factory.mktemp("pp2")
    return folder, run_ranks(2, job(folder, *PP2_INTERLEAVED), folder / "result.json")


def assert_matches(run: dict[str, dict[int, float]], expected: dict[str, dict[int, float]], steps) -> None:
    for key in ("losses", "grad_norms"):
        assert sorted(run[key]) == list(steps), (key, run)
        worst = max(abs(run[key][step] - expected[key][step]) for step in steps)
        print(f"  {key}: max |Δ| {worst:.2e}")
        assert worst < TOLERANCE, (key, worst, run, expected)


@pytest.mark.parametrize(
    ("degrees", "local_batch_size"),
    [
        pytest.param(
            ["--plugins", "pipeline,fsdp", "--parallelism.pp", "2", "--parallelism.dp_shard", "2",
             "--pipeline.schedule", "Interleaved1F1B"],
            GLOBAL_BATCH // 2,
            id="pp2xfsdp2-interleaved",
        ),
        pytest.param(
            ["--plugins", "pipeline,tp", "--parallelism.pp", "2", "--parallelism.tp", "2",
             "--parallelism.dp_shard", "1", "--pipeline.schedule", "1F1B"],
            GLOBAL_BATCH,
            id="pp2xtp2-1f1b",
        ),
    ],
)  # fmt: skip
def test_four_rank_composition_matches_single_process(tmp_path, reference, degrees, local_batch_size):
    argv = job(tmp_path, "--checkpoint.enable", "False", *degrees, local_batch_size=local_batch_size)
    run = run_ranks(4, argv, tmp_path / "result.json")
    assert_matches(run, reference[1], range(1, STEPS + 1))


def test_pp2_matches_single_process(pp2_run, reference):
    assert_matches(pp2_run[1], reference[1], range(1, STEPS + 1))


def copy_checkpoint(source_dump: Path, target_dump: Path, step: int) -> None:
    shutil.copytree(source_dump / "checkpoint" / f"step-{step}", target_dump / "checkpoint" / f"step-{step}")


def test_pp2_checkpoint_resumes_in_one_process(tmp_path, pp2_run):
    dump, pipelined = pp2_run
    assert list_checkpoints(str(dump / "checkpoint")) == [SAVED_STEP, STEPS]
    copy_checkpoint(dump, tmp_path, SAVED_STEP)
    resumed = train_in_this_process(job(tmp_path))
    assert_matches(resumed, pipelined, range(SAVED_STEP + 1, STEPS + 1))


def test_pp2_checkpoint_resumes_under_fsdp2(tmp_path, pp2_run):
    dump, pipelined = pp2_run
    copy_checkpoint(dump, tmp_path, SAVED_STEP)
    argv = job(tmp_path, "--plugins", "fsdp", "--parallelism.dp_shard", "2", local_batch_size=GLOBAL_BATCH // 2)
    resumed = run_ranks(2, argv, tmp_path / "result.json")
    assert_matches(resumed, pipelined, range(SAVED_STEP + 1, STEPS + 1))


def test_single_process_checkpoint_resumes_under_pp2(tmp_path, reference):
    dump, single = reference
    copy_checkpoint(dump, tmp_path, SAVED_STEP)
    resumed = run_ranks(2, job(tmp_path, *PP2_INTERLEAVED), tmp_path / "result.json")
    assert_matches(resumed, single, range(SAVED_STEP + 1, STEPS + 1))


def test_pp2_starts_from_hugging_face_weights(tmp_path, reference):
    """Each stage takes its part of an HF checkpoint (here: the single run's step 4)."""
    from plait.hf import export_checkpoint_to_hf
    from plait.plugins import load_model_spec

    spec = load_model_spec("llama3")
    hf = tmp_path / "hf"
    export_checkpoint_to_hf(reference[0] / "checkpoint" / f"step-{SAVED_STEP}", spec,
                            spec.args_for("debugmodel_tiny4"), hf)
    from_hf = ("--model.hf_dir", str(hf), "--checkpoint.enable", "False")
    single = train_in_this_process(job(tmp_path / "single", *from_hf, steps=2))
    pipelined = run_ranks(2, job(tmp_path / "pp2", *from_hf, "--plugins", "pipeline", "--parallelism.pp", "2", steps=2),
                          tmp_path / "result.json")
    assert_matches(pipelined, single, range(1, 3))
