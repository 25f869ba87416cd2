"""One GPU trains like one CPU, with the same command: each model package's debug recipe,
fp32 (TF32 off, deterministic algorithms), a few steps on the GPU against the same steps on
the CPU; then bf16 and compile on the GPU; then float8 with the GPU's own float8 matmuls
(the CPU tests emulate them). Skipped, with the reason, on a machine without a CUDA GPU."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from plait.cli import train
from plait.testing import keep_determinism_setting, linear_sqnr

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA GPU: the CPU tests train every recipe on the CPU")

STEPS = 3
#: fp32 on both devices, from the same weights (the GPU draws other initial values than the
#: CPU, so both resume from a step-1 checkpoint written on the CPU). Measured on an H200
#: (2026-12-04, torch 2.11): at most 9.5e-7 apart (llama3), 2.4e-7 (flux), 0 (qwen3 MoE,
#: deepseek_v3).
TOLERANCE = {"llama3_debugmodel": 1e-5, "qwen3_moe_debugmodel": 1e-5, "deepseek_v3_debugmodel": 1e-5,
             "flux_debug": 1e-5}
PACKAGES = {"llama3_debugmodel": "plait_llama3", "qwen3_moe_debugmodel": "plait_qwen3",
            "deepseek_v3_debugmodel": "plait_deepseek_v3", "flux_debug": "plait_flux"}
RECIPES = tuple(TOLERANCE)


def job(recipe: str, dump_folder: Path, *extra: str, steps: int = STEPS, checkpoint: bool = False) -> list[str]:
    return [
        "--config", recipe,
        "--training.steps", str(steps),
        "--training.local_batch_size", "2",
        "--training.deterministic", "True",
        "--lr_scheduler.warmup_steps", "1",
        "--validation.interval", "0",
        "--checkpoint.enable", str(checkpoint),
        "--checkpoint.interval", "1",
        "--metrics.progress", "off",
        "--metrics.enable_tensorboard", "False",
        "--job.dump_folder", str(dump_folder),
        *extra,
    ]  # fmt: skip


def train_on_cpu(argv: list[str], monkeypatch):
    """plait takes the GPU whenever torch sees one; the reference hides it."""
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        return keep_determinism_setting(lambda: train(argv))


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_on_one_gpu_matches_the_cpu(recipe, tmp_path, monkeypatch):
    pytest.importorskip(PACKAGES[recipe])
    train_on_cpu(job(recipe, tmp_path / "start", steps=1, checkpoint=True), monkeypatch)
    for device in ("gpu", "cpu"):
        shutil.copytree(tmp_path / "start", tmp_path / device)
    gpu = keep_determinism_setting(lambda: train(job(recipe, tmp_path / "gpu", checkpoint=True)))
    cpu = train_on_cpu(job(recipe, tmp_path / "cpu", checkpoint=True), monkeypatch)
    resumed = range(2, STEPS + 1)
    differences = [abs(gpu.losses[s] - cpu.losses[s]) for s in resumed]
    print(f"{recipe}: GPU {[gpu.losses[s] for s in resumed]}, largest |GPU - CPU| {max(differences):.2e}")
    assert max(differences) < TOLERANCE[recipe], (gpu.losses, cpu.losses)


@pytest.mark.parametrize("extra", [["--training.dtype", "bfloat16"],
                                   ["--training.dtype", "bfloat16", "--compile.enable", "True"]],
                         ids=["bf16", "bf16-compiled"])
def test_llama3_bf16_and_compiled_on_one_gpu_track_fp32(extra, tmp_path):
    fp32 = keep_determinism_setting(lambda: train(job("llama3_debugmodel", tmp_path / "fp32")))
    run = keep_determinism_setting(lambda: train(job("llama3_debugmodel", tmp_path / "run", *extra)))
    differences = [abs(run.losses[s] - fp32.losses[s]) for s in range(1, STEPS + 1)]
    print(f"{' '.join(extra)}: largest |loss - fp32| {max(differences):.2e}")
    assert max(differences) < 2e-3, (run.losses, fp32.losses)  # measured on an H200: 2.5e-4 both


def test_flux_compiled_on_one_gpu_matches_eager(tmp_path):
    """The CPU tests leave flux's compile out (115 s to compile there)."""
    pytest.importorskip("plait_flux")
    eager = keep_determinism_setting(lambda: train(job("flux_debug", tmp_path / "eager")))
    compiled = keep_determinism_setting(lambda: train(job("flux_debug", tmp_path / "compiled",
                                                          "--compile.enable", "True")))
    differences = [abs(compiled.losses[s] - eager.losses[s]) for s in range(1, STEPS + 1)]
    print(f"flux compiled: largest |compiled - eager| {max(differences):.2e}")
    assert max(differences) < 1e-4, (compiled.losses, eager.losses)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "rowwise_with_gw_hp"])
def test_float8_matmuls_on_the_gpu_meet_the_sqnr_bounds(recipe):
    """The float8 plugin's configuration on the GPU's own float8 matmuls (the CPU tests
    emulate them): the same bounds as the emulated test."""
    pytest.importorskip("plait_float8")
    from torchao.float8 import convert_to_float8_training
    from torch import nn

    from plait.builtin import cuda_capabilities
    from plait_float8.config import Float8Config, torchao_config

    if not cuda_capabilities().has("float8_matmul"):
        pytest.skip(f"{torch.cuda.get_device_name()} has no float8 matmuls")
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(4096, 2048, bias=False)).cuda().bfloat16()
    converted = nn.Sequential(nn.Linear(4096, 2048, bias=False)).cuda().bfloat16()
    converted.load_state_dict(reference.state_dict())
    convert_to_float8_training(converted, config=torchao_config(Float8Config(recipe=recipe, auto_filter=False)))
    x = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(1024, 2048, device="cuda", dtype=torch.bfloat16)
    measured = linear_sqnr(reference, converted, x, grad)
    print(f"float8 {recipe} on {torch.cuda.get_device_name()}: SQNR "
          + ", ".join(f"{name} {value:.1f}" for name, value in measured.items()))
    gradient_bound = 20.0 if recipe == "tensorwise" else 17.0
    assert measured["output"] >= 25.0, measured
    assert min(measured["input grad"], measured["weight grad"]) >= gradient_bound, measured


def test_gradient_norm_on_the_gpu_is_the_float64_norm():
    """Plain GPU gradients take the foreach float64 norm (a few launches, no copies): equal
    to the norm of every gradient cast to float64, and clipping scales them by it."""
    from plait.step import clip_grad_norm_

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.empty(shape, device="cuda")) for shape in [(4096, 1024), (1024,), (7, 3, 5)]]
    for param in params:
        param.grad = torch.randn(param.shape, device="cuda") * 3
    expected = torch.cat([p.grad.double().flatten() for p in params]).norm()
    before = [p.grad.clone() for p in params]
    total = clip_grad_norm_(params, max_norm=1.0)
    assert total.device.type == "cuda" and abs(total.double().item() - expected.item()) <= 1e-6 * expected.item()
    for param, grad in zip(params, before):
        torch.testing.assert_close(param.grad, grad / total, rtol=1e-6, atol=0)
