"""Data-parallel layouts train exactly like one process on the same global batch.

Every layout runs as real gloo ranks (one subprocess each, torchrun's environment) on
the tiny llama3; a global batch of 4 sequences is split over the data-parallel ranks,
so the losses and gradient norms must match a single process with local batch 4.
``--training.deterministic`` makes the initial weights independent of the layout.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from plait.checkpoint import list_checkpoints
from plait.cli import train
from plait.errors import ConfigError
from plait.parallel_dims import ParallelDims
from plait.testing import keep_determinism_setting, max_differences, run_ranks, train_in_this_process
from plait.train_state import StepContext

from plait_fsdp import parallelize, plugin
from plait_fsdp.config import FSDPConfig

STEPS = 6
TOLERANCE = 1e-5
GLOBAL_BATCH = 4


def job(dump_folder: Path, *extra: str, local_batch_size: int) -> list[str]:
    return [
        "--config", "llama3_debugmodel",
        "--model.flavor", "debugmodel_tiny",
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
    folder = tmp_path_factory.mktemp("single")
    result = train_in_this_process(job(folder, local_batch_size=GLOBAL_BATCH))
    assert sorted(result["losses"]) == list(range(1, STEPS + 1))
    return result


@pytest.mark.parametrize(
    ("world_size", "degrees", "local_batch_size", "extra"),
    [
        pytest.param(2, ["--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "1"], 2, [], id="ddp2"),
        pytest.param(
            2,
            ["--parallelism.dp_shard", "2"],
            1,
            ["--training.global_batch_size", str(GLOBAL_BATCH),
             "--fsdp.reshard_after_forward", "always", "--fsdp.cpu_offload", "True"],
            id="fsdp2-grad-accumulation-offload",
        ),
        pytest.param(4, ["--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "2"], 1, [], id="hsdp2x2"),
        pytest.param(  # the per-chunk order of docs/plugins.md (Hook order): AC, then compile, then FSDP
            2,
            ["--parallelism.dp_shard", "2"],
            2,
            ["--activation_checkpoint.mode", "full", "--compile.enable", "True"],
            id="fsdp2-full-ac-compile",
        ),
    ],
)
def test_layout_matches_single_process(tmp_path, reference, world_size, degrees, local_batch_size, extra):
    argv = job(tmp_path, "--plugins", "fsdp", *degrees, *extra, local_batch_size=local_batch_size)
    run = run_ranks(world_size, argv, tmp_path / "result.json")
    loss_diff, norm_diff = max_differences(run, reference)
    assert loss_diff < TOLERANCE and norm_diff < TOLERANCE, (loss_diff, norm_diff, run, reference)


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory) -> tuple[Path, dict[str, dict[int, float]]]:
    """FSDP over 2 ranks; its checkpoints feed the resharding test."""
    folder = tmp_path_factory.mktemp("fsdp2")
    argv = job(folder, "--plugins", "fsdp", "--parallelism.dp_shard", "2", local_batch_size=2)
    return folder, run_ranks(2, argv, folder / "result.json")


def test_bf16_mixed_precision_is_close_to_fp32(tmp_path, reference):
    argv = job(tmp_path, "--plugins", "fsdp", "--parallelism.dp_shard", "2", "--training.dtype", "bfloat16",
               local_batch_size=2)
    loss_diff, _ = max_differences(run_ranks(2, argv, tmp_path / "result.json"), reference)
    assert TOLERANCE < loss_diff < 1e-2  # bf16 compute is in effect, and it stays close


def test_fsdp2_matches_single_process(fsdp2_run, reference):
    loss_diff, norm_diff = max_differences(fsdp2_run[1], reference)
    assert loss_diff < TOLERANCE and norm_diff < TOLERANCE, (loss_diff, norm_diff, fsdp2_run[1], reference)


def test_fsdp_checkpoint_resumes_in_a_single_process(fsdp2_run, reference):
    dump_folder, sharded = fsdp2_run
    folder = dump_folder / "checkpoint"
    assert list_checkpoints(str(folder)) == [4, STEPS]
    shutil.rmtree(folder / f"step-{STEPS}")  # resume from step 4, saved by two ranks

    resumed = keep_determinism_setting(lambda: train(job(dump_folder, local_batch_size=GLOBAL_BATCH)))
    assert sorted(resumed.losses) == [5, STEPS]
    for step in (5, STEPS):
        assert abs(resumed.losses[step] - sharded["losses"][step]) < TOLERANCE
        assert abs(resumed.losses[step] - reference["losses"][step]) < TOLERANCE


def validation_config(**fsdp: object) -> SimpleNamespace:
    return SimpleNamespace(fsdp=FSDPConfig(**fsdp))


@pytest.mark.parametrize(
    ("fsdp", "degrees", "message"),
    [
        ({"cpu_offload": True}, {"dp_replicate": 2, "dp_shard": 1, "world_size": 2}, "needs sharded parameters"),
        ({"cpu_offload": True}, {"dp_shard": 2, "tp": 2, "world_size": 4}, "does not support tensor parallelism"),
        ({"reshard_after_forward": "never"}, {"dp_replicate": 2, "dp_shard": 1, "world_size": 2}, "only applies"),
    ],
)
def test_validate_rejects_unsupported_options(fsdp, degrees, message):
    with pytest.raises(ConfigError, match=message):
        plugin.plait_validate(config=validation_config(**fsdp), parallel_dims=ParallelDims(**degrees), model_spec=None)


def test_validate_accepts_sharded_options():
    plugin.plait_validate(
        config=validation_config(cpu_offload=True, reshard_after_forward="always"),
        parallel_dims=ParallelDims(dp_shard=2, world_size=2),
        model_spec=None,
    )


def test_mixed_precision_follows_the_training_dtype():
    bf16 = SimpleNamespace(fsdp=FSDPConfig(), training=SimpleNamespace(dtype="bfloat16"))
    policy = parallelize.mixed_precision_policy(bf16)
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    fp32 = SimpleNamespace(fsdp=FSDPConfig(reduce_dtype="bfloat16"), training=SimpleNamespace(dtype="float32"))
    policy = parallelize.mixed_precision_policy(fp32)
    assert (policy.param_dtype, policy.reduce_dtype) == (None, torch.bfloat16)


@pytest.mark.parametrize(
    ("option", "pipeline", "expected"),
    [("default", False, None), ("default", True, False), ("always", True, True), ("never", False, False)],
)
def test_reshard_after_forward_option(option, pipeline, expected):
    assert parallelize.reshard_after_forward(FSDPConfig(reshard_after_forward=option), pipeline) is expected


def step_context(grad_accumulation_steps: int) -> StepContext:
    """The parts of a StepContext the gradient-sync context reads."""
    return StepContext(step=1, config=None, parallel_dims=None, model_parts=[], optimizer=None,
                       lr_scheduler=None, loss_fn=None, grad_accumulation_steps=grad_accumulation_steps)


def test_gradients_sync_only_in_the_last_micro_batch(monkeypatch):
    calls: list[bool] = []
    monkeypatch.setattr(parallelize, "set_gradient_sync", lambda parts, enabled: calls.append(enabled))
    dims = ParallelDims(dp_shard=2, world_size=2)
    for _step in range(2):
        ctx = step_context(grad_accumulation_steps=3)
        for micro_batch in range(3):
            ctx.micro_batch_index = micro_batch  # as the core's step sets it
            with plugin.plait_train_context(config=None, parallel_dims=dims, ctx=ctx):
                pass
    # off (and back on when leaving) for the first two micro-batches, on for the last
    assert calls == [False, True, False, True, True] * 2
    assert plugin.plait_train_context(
        config=None, parallel_dims=dims, ctx=step_context(grad_accumulation_steps=1)
    ) is None


def test_cpu_ranks_initialize_like_one_process_without_deterministic_mode(tmp_path):
    """DTensor random ops cannot draw per shard on CPU (every shard would get the same
    numbers), so sharded CPU runs load the weights one process initializes."""
    argv = job(tmp_path / "fsdp", "--plugins", "fsdp", "--parallelism.dp_shard", "2", local_batch_size=2)
    argv[argv.index("--training.deterministic") + 1] = "False"
    single = job(tmp_path / "single", local_batch_size=GLOBAL_BATCH)
    single[single.index("--training.deterministic") + 1] = "False"
    reference = train(single)
    sharded = run_ranks(2, argv, tmp_path / "result.json")
    assert abs(sharded["losses"][1] - reference.losses[1]) < TOLERANCE
