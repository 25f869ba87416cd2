import pytest
import torch

from plait.config import LRSchedulerSection, OptimizerSection
from plait.optim import build_lr_scheduler, build_optimizer, lr_factor


def factors(steps, **kw):
    section = LRSchedulerSection(**kw)
    return [lr_factor(s, total_steps=steps, section=section) for s in range(steps)]


def test_warmup_stable_decay_shape():
    f = factors(10, warmup_steps=2, decay_ratio=0.5, decay_type="linear")
    assert f[:2] == pytest.approx([1 / 3, 2 / 3])
    assert f[2:6] == [1.0, 1.0, 1.0, 1.0]  # 8 steps after warmup, half of them decay
    assert f[6:] == pytest.approx([1 - 1 / 5, 1 - 2 / 5, 1 - 3 / 5, 1 - 4 / 5])
    assert all(x > 0 for x in f)


@pytest.mark.parametrize("kind", ["linear", "sqrt", "cosine"])
def test_decay_is_monotonic_and_floored(kind):
    f = factors(50, warmup_steps=5, decay_type=kind, min_lr_factor=0.1)
    tail = f[5:]
    assert all(a >= b for a, b in zip(tail, tail[1:]))
    assert min(tail) >= 0.1


def test_scheduler_drives_optimizer_lr():
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(OptimizerSection(lr=1e-2), [model])
    sched = build_lr_scheduler(LRSchedulerSection(warmup_steps=3), opt, total_steps=10)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:3] == pytest.approx([1e-2 / 4, 2e-2 / 4, 3e-2 / 4])


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(OptimizerSection(weight_decay=0.1), [model])
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight)}


def test_fused_is_the_default_and_falls_back_to_foreach_where_torch_has_no_kernel(caplog):
    fused = build_optimizer(OptimizerSection(), [torch.nn.Linear(4, 4)])
    assert fused.defaults["fused"] and not fused.defaults["foreach"]

    complex_model = torch.nn.Linear(4, 4, bias=False, dtype=torch.complex64)
    with caplog.at_level("INFO", logger="plait"):
        fallback = build_optimizer(OptimizerSection(), [complex_model])
    assert not fallback.defaults["fused"] and fallback.defaults["foreach"]
    assert "no fused AdamW for torch.complex64 parameters on cpu; using foreach" in caplog.text
    complex_model(torch.randn(2, 4, dtype=torch.complex64)).abs().sum().backward()
    fallback.step()  # runs


def test_a_warmup_as_long_as_the_run_is_warned_about():
    from plait.config import LRSchedulerSection
    from plait.optim import schedule_warnings

    (warning,) = schedule_warnings(LRSchedulerSection(warmup_steps=10), total_steps=10)
    assert "--lr_scheduler.warmup_steps 10 is not shorter than --training.steps 10" in warning
    assert "ends at 91% of it" in warning
    assert schedule_warnings(LRSchedulerSection(warmup_steps=9, decay_ratio=1.0), total_steps=10) == []


def test_grad_norm_is_exact_and_clips():
    """The total norm of plain gradients (float32 row norms summed in float64) matches a
    float64 reference to float32's rounding, where one float32 reduction over each gradient
    is off by ~4e-5."""
    from plait.step import clip_grad_norm_

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.empty(shape)) for shape in ((1024, 2048), (2048,), ())]
    for param in params:
        param.grad = torch.randn(param.shape) * 3 + 1
    reference = torch.stack([p.grad.double().square().sum() for p in params]).sum().sqrt()
    total = clip_grad_norm_(params, max_norm=0.0)
    assert abs(total.double() / reference - 1) < 1e-7
    clip_grad_norm_(params, max_norm=1.0)
    clipped = torch.stack([p.grad.double().square().sum() for p in params]).sum().sqrt()
    assert abs(clipped - 1.0) < 1e-5
