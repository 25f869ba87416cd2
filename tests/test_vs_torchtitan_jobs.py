"""The side-by-side benchmark's job definitions (benchmarks/vs_torchtitan_jobs.py) against
plait's flavors and options, and its GEMM list against the model-FLOPs formula. Fast: no
training, and no torchtitan (it is not installed here)."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from vs_torchtitan_jobs import JOBS, Gemm, Job, step_gemms  # noqa: E402
from vs_torchtitan_plait import check_shape, plait_argv  # noqa: E402

from plait_llama3.model import count_parameters  # noqa: E402
from plait_llama3.spec import FLAVORS, flops_per_token  # noqa: E402


@pytest.mark.parametrize("name", sorted(JOBS))
def test_job_model_is_the_plait_flavor(name: str) -> None:
    job = JOBS[name]
    args = FLAVORS[job.plait_flavor]
    check_shape(args, job)  # raises SystemExit on any difference
    assert job.shape.num_parameters() == count_parameters(args)


def test_a_different_shape_is_refused() -> None:
    job = JOBS["debugmodel"]
    wider = job.with_overrides(shape=dataclasses.replace(job.shape, ffn_dim=1024))
    with pytest.raises(SystemExit, match="debugmodel"):
        check_shape(FLAVORS[job.plait_flavor], wider)


def test_the_100M_job_is_about_100M_parameters() -> None:
    assert 95e6 < JOBS["100M"].shape.num_parameters() < 110e6


def test_the_gpu_job_is_about_1B_parameters_in_bf16() -> None:
    job = JOBS["1B"]
    assert 0.95e9 < job.shape.num_parameters() < 1.05e9
    assert (job.dtype, job.shape.n_kv_heads) == ("bfloat16", 8)
    assert job.warmup_steps < job.steps


@pytest.mark.parametrize("name", sorted(JOBS))
def test_step_gemms_are_the_linear_part_of_the_model_flops(name: str) -> None:
    job = JOBS[name]
    args = dataclasses.replace(FLAVORS[job.plait_flavor], max_seq_len=job.seq_len)
    shape = job.shape
    norms = (2 * shape.n_layers + 1) * shape.dim
    attention = 12 * shape.n_layers * shape.n_heads * shape.head_dim * job.seq_len
    gemm_flops = sum(g.flops * g.count for g in step_gemms(job))
    assert gemm_flops == job.tokens_per_step * (flops_per_token(args, job.seq_len) - attention - 6 * norms)
    assert {g.kind for g in step_gemms(job)} == {"forward", "grad_input", "grad_weight"}


def test_gemm_ops_have_the_layouts_autograd_uses() -> None:
    import torch
    from gemm_throughput import gemm_op

    for kind in ("forward", "grad_input", "grad_weight"):
        gemm = Gemm(name=kind, kind=kind, m=5, n=3, k=4, count=1)
        assert tuple(gemm_op(gemm)().shape) == (5, 3)
        assert gemm_op(gemm, dtype="bfloat16")().dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown GEMM kind"):
        gemm_op(Gemm(name="x", kind="sideways", m=1, n=1, k=1, count=1))


def test_time_call_waits_for_the_device_before_reading_the_clock() -> None:
    from gemm_throughput import time_call

    events = []
    seconds = time_call(lambda: events.append("call"), min_seconds=0.001, repeats=2,
                        synchronize=lambda: events.append("sync"))
    assert seconds > 0
    assert events[:2] == ["call", "sync"]  # the untimed first call
    assert events[-1] == "sync"
    assert events.count("call") > events.count("sync") > 2  # timed in batches, each ending with a sync


def test_job_survives_its_json_file() -> None:
    job = JOBS["100M"].with_overrides(lr_factors=(0.5, 1.0), device="cuda", compile=True)
    assert Job.from_json(job.to_json()) == job


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_runs_see_a_gpu_only_for_a_gpu_job(device: str) -> None:
    from vs_torchtitan import child_env

    env = child_env(threads=1, device=device)
    assert env["VS_TORCHTITAN_DEVICE"] == device
    assert (env.get("CUDA_VISIBLE_DEVICES") == "") == (device == "cpu")


def write_tokenizer_folder(folder: Path) -> None:
    import json

    from plait.data.embedded import BOS_TOKEN, EOS_TOKEN, embedded_tokenizer, embedded_tokenizer_path

    embedded_tokenizer()  # trains and caches it if needed
    folder.mkdir()
    (folder / "tokenizer.json").write_text(embedded_tokenizer_path().read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN}))


@pytest.mark.parametrize(("data", "compile"), [("files", False), ("embedded", True)])
def test_plait_options_are_the_job(tmp_path: Path, data: str, compile: bool) -> None:
    from plait.cli import resolve_train_config

    job = JOBS["debugmodel"].with_overrides(compile=compile)
    (tmp_path / "corpus.jsonl").write_text('{"text": "x"}\n')
    write_tokenizer_folder(tmp_path / "tokenizer")  # the job's vocabulary is read from it
    config = resolve_train_config(plait_argv(job, tmp_path, data), world_size=1).config
    training, optimizer = config.training, config.optimizer
    assert (config.model.name, config.model.flavor) == ("llama3", job.plait_flavor)
    assert (training.steps, training.seq_len, training.local_batch_size) == (job.steps, job.seq_len, job.batch_size)
    assert (training.seed, training.dtype, training.max_norm) == (job.seed, job.dtype, job.max_norm)
    assert (optimizer.lr, optimizer.beta1, optimizer.beta2) == (job.lr, *job.betas)
    assert (optimizer.eps, optimizer.weight_decay) == (job.eps, job.weight_decay)
    assert config.lr_scheduler.warmup_steps == job.lr_warmup_steps
    assert not config.checkpoint.enable
    assert config.compile.enable == compile
    assert bool(config.data.dataset) == (data == "files")
