"""bf16 compute over fp32 weights (``--training.dtype bfloat16`` where no plugin applies
the dtype itself) without holding a bf16 copy of every weight from forward to backward.

Autocast casts each weight at its use. With its cast cache on, the copies live until the
context exits (after the backward); with it off, autograd still saves each copy for its
matmul's backward. Here the cache is off and autograd saves, for a tensor that is a cast
of a parameter, only the parameter and where the view sat: the backward casts again. One
more cast per weight and micro-batch; at the 100M job that was 0.19 GiB (every weight in
bf16) off the live peak and within the noise of the step time (docs/performance.md).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def autocast_recasting_weights(device_type: str, dtype: torch.dtype) -> Iterator[None]:
    """``torch.autocast`` in ``dtype`` whose saved weight casts are recast in the backward."""
    with (torch.autocast(device_type=device_type, dtype=dtype, cache_enabled=False),
          torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)):
        yield


class _ParameterCast:
    """What is saved in place of a low-precision cast of a parameter (or a view of one)."""

    __slots__ = ("parameter", "dtype", "size", "stride", "offset")

    def __init__(self, parameter: nn.Parameter, saved: torch.Tensor) -> None:
        self.parameter = parameter
        self.dtype = saved.dtype
        self.size, self.stride, self.offset = saved.size(), saved.stride(), saved.storage_offset()

    def recast(self) -> torch.Tensor:
        with torch.no_grad():
            return self.parameter.to(self.dtype).as_strided(self.size, self.stride, self.offset)


def _pack(saved: torch.Tensor) -> Any:
    parameter = _cast_source(saved)
    return saved if parameter is None else _ParameterCast(parameter, saved)


def _unpack(packed: Any) -> torch.Tensor:
    return packed.recast() if isinstance(packed, _ParameterCast) else packed


def _cast_source(saved: torch.Tensor) -> nn.Parameter | None:
    """The parameter ``saved`` is a floating-point cast of (or a view of such a cast); None
    otherwise. Plain tensors only: a tensor subclass (DTensor, float8) is saved as it is."""
    if type(saved) is not torch.Tensor or saved.dtype not in (torch.bfloat16, torch.float16):
        return None
    cast = saved._base if saved._base is not None else saved
    grad_fn = cast.grad_fn
    if grad_fn is None or type(grad_fn).__name__ != "ToCopyBackward0":
        return None
    source = getattr(grad_fn.next_functions[0][0], "variable", None)  # AccumulateGrad of a leaf
    if not isinstance(source, nn.Parameter) or type(source.data) is not torch.Tensor:
        return None
    if source.dtype != torch.float32:
        return None
    return source
