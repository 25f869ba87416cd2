"""What a run imports and builds before its first step: eager runs leave torch._dynamo
and torch.distributed.checkpoint alone until something needs them, with the same model,
optimizer and results."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from plait.meta_init import materialize, on_meta
from plait.optim import AdamW

HERE = Path(__file__).parent

LAZY_MODULES = ("torch._dynamo", "torch.distributed.checkpoint", "torch.distributed.tensor", "sympy")

SCRIPT = """
import sys
sys.path.insert(0, {here!r})
from toy_model import ToyModelPlugin, toy_config, train_toy

config = toy_config({folder!r}, steps=2)
config.checkpoint.enable = {checkpoint}
train_toy(config, ToyModelPlugin())
print(sorted(name for name in {lazy!r} if name in sys.modules))
"""


@pytest.mark.parametrize("checkpoint", [False, True])
def test_an_eager_run_imports_the_compiler_and_checkpointing_only_to_save(tmp_path, checkpoint: bool) -> None:
    """Without checkpoints an eager run imports neither torch's compiler nor DCP (together
    about 1 s and 75 MiB); with them, the first save does."""
    code = SCRIPT.format(here=str(HERE), folder=str(tmp_path), checkpoint=checkpoint, lazy=LAZY_MODULES)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    imported = eval(done.stdout.strip().splitlines()[-1])  # noqa: S307 - our own printed list
    if checkpoint:
        assert {"torch._dynamo", "torch.distributed.checkpoint"} <= set(imported)
    else:
        assert imported == []


def test_modules_built_on_meta_skip_their_constructors_initialization() -> None:
    with on_meta():
        model = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 4), nn.LayerNorm(4))
        drawn = torch.empty(3).normal_()
    assert all(p.is_meta for p in model.parameters()) and drawn.is_meta
    model[1].weight.requires_grad_(False)
    materialize(model, "cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert not model[1].weight.requires_grad and model[1].bias.requires_grad
    assert isinstance(model[0].weight, nn.Parameter) and model[0].weight.shape == (8, 4)


def test_materialize_keeps_a_non_contiguous_tensors_strides() -> None:
    module = nn.Module()
    module.register_buffer("transposed", torch.empty(4, 6, device="meta").t())
    materialize(module, "cpu")
    assert module.transposed.shape == (6, 4) and module.transposed.stride() == (1, 6)


@pytest.mark.parametrize("implementation", ["fused", "foreach"])
def test_adamw_steps_exactly_as_torchs(implementation: str) -> None:
    torch.manual_seed(0)
    reference = nn.Linear(8, 8)
    ours = nn.Linear(8, 8)
    ours.load_state_dict(reference.state_dict())
    options = dict(lr=1e-2, weight_decay=0.1, fused=implementation == "fused", foreach=implementation == "foreach")
    torch_optimizer = torch.optim.AdamW(reference.parameters(), **options)
    optimizer = AdamW(ours.parameters(), **options)
    calls: list[str] = []
    optimizer.register_step_pre_hook(lambda *_: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *_: calls.append("post"))
    for step in range(3):
        inputs = torch.randn(4, 8)
        for model, opt in ((reference, torch_optimizer), (ours, optimizer)):
            opt.zero_grad()
            model(inputs).square().sum().backward()
            opt.step()
        assert calls == ["pre", "post"] * (step + 1)
    for mine, theirs in zip(ours.parameters(), reference.parameters()):
        assert torch.equal(mine, theirs)
    assert all(p.grad is not None for p in ours.parameters())
    optimizer.zero_grad()
    assert all(p.grad is None for p in ours.parameters())
    restored = torch.optim.AdamW(nn.Linear(8, 8).parameters(), **options)
    restored.load_state_dict(optimizer.state_dict())
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg"], torch_optimizer.state_dict()["state"][0]["exp_avg"])
    optimizer.load_state_dict(torch_optimizer.state_dict())
    assert torch.equal(optimizer.state[ours.weight]["exp_avg_sq"], torch_optimizer.state[reference.weight]["exp_avg_sq"])
