"""float8 training runs of the tiny llama3: each recipe tracks the float32 run within a
stated band; FSDP 2 (with and without float8 all-gather) and TP 2 match the one-process
float8 run of the same recipe within 1e-5 (the same arithmetic in another layout);
every run takes micro-batches of 2 sequences (one process: 2 accumulated per step),
because dynamic tensorwise scales of activations depend on the micro-batch they see;
checkpoints stay high precision and resume with or without the plugin.

Emulated float8 (CPU): the casts and scales are float8's, the matmuls run in float32."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from plait.cli import train
from plait.testing import (
    keep_determinism_setting,
    max_differences,
    run_ranks_in_sequence,
    train_in_this_process,
)

STEPS = 6
#: The recipes are compared with float32 over the first steps only (time).
RECIPE_STEPS = 3
TOLERANCE = 1e-5
GLOBAL_BATCH = 4
#: |loss(float8) - loss(float32)| at every step of the tiny llama3 (measured: at most 2e-3).
FLOAT8_BAND = 1e-2


def job(dump_folder: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return [
        "--config", "llama3_debugmodel",
        "--model.flavor", "debugmodel_tiny",
        "--training.steps", str(steps),
        "--training.seq_len", "64",
        "--training.local_batch_size", "2",
        "--training.global_batch_size", str(GLOBAL_BATCH),
        "--training.deterministic", "True",
        "--lr_scheduler.warmup_steps", "2",
        "--checkpoint.interval", "3",
        "--metrics.progress", "off",
        "--job.pg_timeout_seconds", "90",
        "--job.dump_folder", str(dump_folder),
        *extra,
    ]  # fmt: skip


def float8(recipe: str = "tensorwise", *, plugins: str = "float8") -> list[str]:
    return ["--plugins", plugins, "--float8.emulate", "True", "--float8.auto_filter", "False",
            "--float8.recipe", recipe]


@pytest.fixture(scope="module")
def float32_run(tmp_path_factory) -> dict[str, dict[int, float]]:
    return train_in_this_process(job(tmp_path_factory.mktemp("float32"), steps=RECIPE_STEPS))


@pytest.fixture(scope="module")
def tensorwise_run(tmp_path_factory) -> tuple[Path, dict[str, dict[int, float]]]:
    folder = tmp_path_factory.mktemp("tensorwise")
    return folder, train_in_this_process(job(folder, *float8()))


def test_recipes_track_float32(tmp_path, float32_run, tensorwise_run):
    """Every recipe over the first RECIPE_STEPS steps."""
    for recipe in ("tensorwise", "rowwise", "rowwise_with_gw_hp"):
        if recipe == "tensorwise":
            run = tensorwise_run[1]
        else:
            run = train_in_this_process(job(tmp_path / recipe, *float8(recipe), steps=RECIPE_STEPS))
        loss_diff = max(abs(run["losses"][step] - loss) for step, loss in float32_run["losses"].items())
        assert TOLERANCE < loss_diff < FLOAT8_BAND, (recipe, loss_diff)  # float8 is in effect, and close


def test_layouts_match_one_process(tmp_path, tensorwise_run):
    """FSDP 2, TP 2 and FSDP 2 with float8 all-gather, one after the other in one launch of 2 ranks.

    Weights wrapped for the float8 all-gather draw their initial values differently
    (torchao's wrapper tensor), so that layout resumes the one-process run's step-3
    checkpoint and must then match it step for step; its resume also checks that a float8
    checkpoint resumes with the plugin."""
    folder, reference = tensorwise_run
    all_gather = tmp_path / "fsdp2_float8_all_gather"
    shutil.copytree(folder / "checkpoint" / "step-3", all_gather / "checkpoint" / "step-3")
    fsdp = (*float8(plugins="float8,fsdp"), "--parallelism.dp_shard", "2")
    jobs = [job(tmp_path / "fsdp2", *fsdp), job(tmp_path / "tp2", *float8(plugins="float8,tp"), "--parallelism.tp", "2"),
            job(all_gather, *fsdp, "--float8.fsdp_float8_all_gather", "True")]
    fsdp2, tp2, resumed = run_ranks_in_sequence(2, jobs, tmp_path / "result.json", timeout=400)
    for layout, run in (("fsdp2", fsdp2), ("tp2", tp2)):
        loss_diff, norm_diff = max_differences(run, reference)
        assert loss_diff < TOLERANCE and norm_diff < TOLERANCE, (layout, loss_diff, norm_diff)
    assert sorted(resumed["losses"]) == [4, 5, 6]
    for step in (4, 5, 6):
        assert abs(resumed["losses"][step] - reference["losses"][step]) < TOLERANCE, (step, resumed, reference)
        assert abs(resumed["grad_norms"][step] - reference["grad_norms"][step]) < TOLERANCE, (step, resumed, reference)


def test_checkpoint_resumes_without_the_plugin(tmp_path, tensorwise_run):
    """The same weights, now trained in float32 (resuming with the plugin: the all-gather
    layout of ``test_layouts_match_one_process``)."""
    folder, reference = tensorwise_run
    shutil.copytree(folder / "checkpoint" / "step-3", tmp_path / "checkpoint" / "step-3")
    resumed = keep_determinism_setting(lambda: train(job(tmp_path)))
    assert sorted(resumed.losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert 0 < abs(resumed.losses[step] - reference["losses"][step]) < FLOAT8_BAND


def test_checkpoint_holds_high_precision_weights(tensorwise_run):
    import torch
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(tensorwise_run[0] / "checkpoint" / "step-6")).read_metadata()
    weight = metadata.state_dict_metadata["model.layers.0.attention.wq.weight"]
    assert weight.properties.dtype == torch.float32 and tuple(weight.size) == (64, 64)
