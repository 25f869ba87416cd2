"""AdamW and the warmup-stable-decay learning-rate schedule."""
from __future__ import annotations

import inspect
import logging
import math
from functools import partial

import torch
from torch import nn

from plait.config import LRSchedulerSection, OptimizerSection

logger = logging.getLogger("plait")


def build_optimizer(section: OptimizerSection, model_parts: list[nn.Module]) -> torch.optim.Optimizer:
    """AdamW over all parameters; weight decay only on matrices (not norms or biases).
    ``fused`` (the default) falls back to ``foreach`` where torch has no fused kernel for
    the parameters' device or dtype."""
    params = [p for part in model_parts for p in part.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": section.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    implementation = section.implementation
    unsupported = next((p for p in params if not _fused_supported(p)), None) if implementation == "fused" else None
    if unsupported is not None:
        logger.info(
            "optimizer: torch has no fused AdamW for %s parameters on %s; using foreach",
            unsupported.dtype, unsupported.device.type,
        )
        implementation = "foreach"
    return AdamW(
        groups,
        lr=section.lr,
        betas=(section.beta1, section.beta2),
        eps=section.eps,
        foreach=implementation == "foreach",
        fused=implementation == "fused",
    )


class AdamW(torch.optim.AdamW):
    """torch's AdamW, without importing ``torch._dynamo`` in a run that does not compile.

    torch wraps the optimizer's methods in decorators that keep them out of compiled
    graphs, and whose first call imports ``torch._dynamo`` (about 1 s of the start and
    70 MiB of memory). plait never compiles the optimizer step, so these methods call
    torch's own implementations beneath the decorators: the same arithmetic, state and
    hooks (the step hooks run in the wrapper torch puts around ``step``).
    """

    def add_param_group(self, param_group: dict) -> None:
        inspect.unwrap(torch.optim.Optimizer.add_param_group)(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        inspect.unwrap(torch.optim.Optimizer.zero_grad)(self, set_to_none)

    def state_dict(self) -> dict:
        return inspect.unwrap(torch.optim.Optimizer.state_dict)(self)

    def load_state_dict(self, state_dict: dict) -> None:
        inspect.unwrap(torch.optim.Optimizer.load_state_dict)(self, state_dict)

    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch's signature
        with torch.no_grad():  # what torch's decorator sets for an optimizer that is not differentiable
            return inspect.unwrap(torch.optim.AdamW.step)(self, closure)


def _fused_supported(param: torch.Tensor) -> bool:
    """Whether torch's fused AdamW takes this parameter (its own check: a floating-point
    tensor on a device with fused optimizer kernels)."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    return param.device.type in _get_fused_kernels_supported_devices() and torch.is_floating_point(param)


def schedule_warnings(section: LRSchedulerSection, total_steps: int) -> list[str]:
    """What in the schedule is probably not what the user meant (the run still trains).
    The decay is a share of the steps after warmup, so only the warmup can outlast the run."""
    if section.warmup_steps >= total_steps:
        final = lr_factor(total_steps - 1, total_steps=total_steps, section=section)
        return [
            f"--lr_scheduler.warmup_steps {section.warmup_steps} is not shorter than --training.steps "
            f"{total_steps}: the learning rate never reaches --optimizer.lr (it ends at {final:.0%} of it) "
            f"and never decays; lower the warmup or train longer"
        ]
    return []


def lr_factor(step: int, *, total_steps: int, section: LRSchedulerSection) -> float:
    """Multiplier of the peak LR for the optimizer step with 0-based index ``step``."""
    warmup = min(section.warmup_steps, total_steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    after_warmup = total_steps - warmup
    ratio = 1.0 if section.decay_ratio is None else section.decay_ratio
    decay_steps = round(after_warmup * ratio)
    stable_end = total_steps - decay_steps
    if step < stable_end or decay_steps == 0:
        return 1.0
    progress = (step - stable_end + 1) / (decay_steps + 1)
    if section.decay_type == "linear":
        shape = 1.0 - progress
    elif section.decay_type == "sqrt":
        shape = 1.0 - math.sqrt(progress)
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return section.min_lr_factor + (1.0 - section.min_lr_factor) * shape


def build_lr_scheduler(
    section: LRSchedulerSection, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, total_steps=total_steps, section=section)
    )
