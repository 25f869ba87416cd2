"""Building a model on the meta device and materializing it, without torch's Python meta
kernels.

On the meta device a module constructor's own initialization (``nn.Linear`` draws its
weight, ``nn.Embedding`` its table) has nothing to fill, but torch still runs it, through
Python decompositions: the first one imports ``torch._dynamo`` (about 1 s and 70 MiB in a
process that never compiles), and ``Module.to_empty`` on meta tensors imports the
symbolic-shapes machinery and sympy (0.3 s). Models are initialized by their
``init_weights`` after materialization anyway, so both are skipped here.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

#: Tensor methods that fill a tensor with random numbers (in place, returning it).
_RANDOM_FILLS = frozenset({
    torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.bernoulli_, torch.Tensor.exponential_,
    torch.Tensor.geometric_, torch.Tensor.log_normal_, torch.Tensor.cauchy_, torch.Tensor.random_,
})


class _SkipInitOnMeta(TorchFunctionMode):
    """``torch.nn.init``'s in-place initializers and the random fills return a meta tensor
    untouched: they only write values, which a meta tensor has none of."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        if isinstance(target, torch.Tensor) and target.is_meta and _is_initializer(func):
            return target
        return func(*args, **kwargs)


def _is_initializer(func) -> bool:  # noqa: ANN001
    if func in _RANDOM_FILLS:
        return True
    return getattr(func, "__module__", None) == "torch.nn.init" and func.__name__.endswith("_")


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Modules built inside have their parameters and buffers on the meta device, with
    their constructors' initialization skipped."""
    with torch.device("meta"), _SkipInitOnMeta():
        yield


def materialize(module: nn.Module, device: str | torch.device) -> nn.Module:
    """``module.to_empty(device=device)``: every parameter and buffer replaced by an
    uninitialized tensor of its shape and dtype on ``device``. Plain contiguous meta tensors
    are allocated directly; others (DTensors, subclasses, non-contiguous) as torch does."""

    def empty(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_meta and type(tensor) in (torch.Tensor, nn.Parameter) and tensor.is_contiguous():
            return torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
        return torch.empty_like(tensor, device=device)

    return module._apply(empty)
