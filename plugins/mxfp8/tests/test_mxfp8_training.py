"""MXFP8 training runs (emulated): the tiny llama3 and a one-layer qwen3 MoE debug model
each track their float32 run within a stated band; FSDP 2, TP 2, HSDP (dp_replicate 2 ×
dp_shard 1), PP 2, CP 2 and FSDP 2 with full activation checkpointing (tiny llama3), and
EP 2 over dp_shard 2 (the MoE model), all in one launch of 2 ranks, match the one-process
MXFP8 run within 1e-5 (the same arithmetic in another layout); compiled with full
activation checkpointing matches eager (on request: its cold compile is over the time
budget); the checkpoint holds plain float32 weights.

Every layout sees the one-process run's micro-batches: one sequence of 128 tokens (a
multiple of the MXFP8 block of 32), two accumulated per step in one process, one per rank
in two ranks. The weight gradient scales blocks of 32 consecutive tokens, so a layout
matches one process only where it keeps those blocks whole: CP 2 gives each rank the
head and tail quarter of a sequence (32 positions each at 128), TP shards features in
multiples of 32."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from plait.testing import max_differences, run_ranks_in_sequence, train_in_this_process

STEPS = 2
TOLERANCE = 1e-5
#: |loss(mxfp8) - loss(float32)| at every step of the tiny llama3 (measured: at most 3e-5).
LLAMA_BAND = 1e-3
#: The same for the qwen3 MoE debug model, experts in MXFP8 with bfloat16 outputs
#: (measured: at most 8e-4).
MOE_BAND = 5e-3


LLAMA = ("--config", "llama3_debugmodel", "--model.flavor", "debugmodel_tiny", "--training.seq_len", "128")
#: One MoE layer; the auxiliary loss per sequence: the same mean however the batch is split.
MOE = ("--config", "qwen3_moe_debugmodel", "--model.args.n_layers", "1", "--moe.aux_loss_type", "sequence",
       "--training.seq_len", "64")


def job(dump_folder: Path, *extra: str, model: tuple[str, ...] = LLAMA) -> list[str]:
    return [
        *model,
        "--training.steps", str(STEPS),
        "--training.local_batch_size", "1",
        "--training.global_batch_size", "2",
        "--training.deterministic", "True",
        "--lr_scheduler.warmup_steps", "1",
        "--checkpoint.enable", "False",
        "--metrics.progress", "off",
        "--job.pg_timeout_seconds", "120",
        "--job.dump_folder", str(dump_folder),
        *extra,
    ]  # fmt: skip


def moe_job(dump_folder: Path, *extra: str) -> list[str]:
    return job(dump_folder, *extra, model=MOE)


def mxfp8(plugins: str = "mxfp8") -> list[str]:
    return ["--plugins", plugins, "--mxfp8.emulate", "True"]


@pytest.fixture(scope="module")
def mxfp8_run(tmp_path_factory) -> tuple[Path, dict[str, dict[int, float]]]:
    folder = tmp_path_factory.mktemp("mxfp8")
    return folder, train_in_this_process(job(folder, *mxfp8(), "--checkpoint.enable", "True",
                                             "--checkpoint.interval", str(STEPS)))


@pytest.fixture(scope="module")
def moe_mxfp8_run(tmp_path_factory) -> dict[str, dict[int, float]]:
    return train_in_this_process(moe_job(tmp_path_factory.mktemp("moe_mxfp8"), *mxfp8()))


LAYOUTS = {
    "fsdp2": ("mxfp8,fsdp", "--parallelism.dp_shard", "2"),
    "tp2": ("mxfp8,tp", "--parallelism.tp", "2"),
    "hsdp": ("mxfp8,fsdp", "--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "1"),
    "pp2": ("mxfp8,pipeline", "--parallelism.pp", "2", "--training.local_batch_size", "2",
            "--pipeline.microbatches", "2"),
    "cp2": ("mxfp8,context-parallel,fsdp", "--parallelism.cp", "2"),
    "fsdp2_full_ac": ("mxfp8,fsdp", "--parallelism.dp_shard", "2", "--activation_checkpoint.mode", "full"),
}


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory) -> dict[str, dict[str, dict[int, float]]]:
    """Every layout, one after the other in one launch of 2 ranks."""
    folder = tmp_path_factory.mktemp("layouts")
    jobs = [job(folder / name, *mxfp8(plugins), *options) for name, (plugins, *options) in LAYOUTS.items()]
    jobs.append(moe_job(folder / "ep2", *mxfp8("mxfp8,ep,fsdp"), "--parallelism.dp_shard", "2",
                        "--parallelism.ep", "2"))
    runs = run_ranks_in_sequence(2, jobs, folder / "result.json", timeout=400)
    return dict(zip([*LAYOUTS, "ep2"], runs))


@pytest.mark.parametrize("layout", [*LAYOUTS, "ep2"])
def test_layout_matches_one_process(layout, layout_runs, mxfp8_run, moe_mxfp8_run):
    one_process = moe_mxfp8_run if layout == "ep2" else mxfp8_run[1]
    loss_diff, norm_diff = max_differences(layout_runs[layout], one_process)
    assert loss_diff < TOLERANCE and norm_diff < TOLERANCE, (loss_diff, norm_diff)


@pytest.mark.skipif(os.environ.get("PLAIT_SLOW_COMPILE_TESTS") != "1",
                    reason="70-100 s with a cold inductor cache on 2 cores, over the tests' time budget; "
                           "set PLAIT_SLOW_COMPILE_TESTS=1 to run it")
def test_compile_with_activation_checkpointing_matches_eager(tmp_path, mxfp8_run):
    """Every block recomputed (full AC) and compiled, against the eager run without AC
    (measured: 9.5e-7 in loss, gradient norms equal). Inductor compiles a block's forward,
    recomputation and backward through torchao's emulated MXFP8 casts, and the loss:
    measured 70-100 s cold, 20-26 s warm, on 2 busy cores, so it runs on request only."""
    compiled = train_in_this_process(job(tmp_path, *mxfp8(), "--activation_checkpoint.mode", "full",
                                         "--compile.enable", "True"))
    loss_diff, norm_diff = max_differences(compiled, mxfp8_run[1])
    assert loss_diff < TOLERANCE and norm_diff < TOLERANCE, (loss_diff, norm_diff)


def test_llama_tracks_float32(tmp_path, mxfp8_run):
    loss_diff, _ = max_differences(mxfp8_run[1], train_in_this_process(job(tmp_path)))
    assert TOLERANCE < loss_diff < LLAMA_BAND, loss_diff  # MXFP8 is in effect, and close


def test_moe_tracks_float32(tmp_path, moe_mxfp8_run):
    loss_diff, _ = max_differences(moe_mxfp8_run, train_in_this_process(moe_job(tmp_path)))
    assert TOLERANCE < loss_diff < MOE_BAND, loss_diff  # MXFP8 is in effect, and close


def test_checkpoint_holds_plain_float32_weights(mxfp8_run):
    import torch
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(mxfp8_run[0] / "checkpoint" / f"step-{STEPS}")).read_metadata()
    weight = metadata.state_dict_metadata["model.layers.0.attention.wq.weight"]
    assert weight.properties.dtype == torch.float32 and tuple(weight.size) == (64, 64)
