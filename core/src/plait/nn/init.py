"""Weight initialization helpers."""
from __future__ import annotations

import sys

import torch
from torch import nn


@torch.no_grad()
def trunc_normal_(tensor: torch.Tensor, *, std: float, mean: float = 0.0, bound: float = 3.0) -> torch.Tensor:
    """Fill ``tensor`` in place from the normal distribution ``N(mean, std²)`` truncated to
    ``mean ± bound·std``, and return it.

    The same distribution as ``nn.init.trunc_normal_(tensor, mean, std, a=mean - bound·std,
    b=mean + bound·std)``, drawn faster: one normal draw of the whole tensor, then only the
    values that fall outside the bounds are drawn again (until none is left), where torch
    redraws the whole tensor in every round. Uses torch's default generator, so
    ``torch.manual_seed`` makes it deterministic; a meta tensor is left as it is. DTensors
    go to ``nn.init.trunc_normal_``, which draws them shard-aware; other tensor subclasses
    (low-precision weight wrappers, which compute on a plain tensor inside) are drawn as
    plain tensors, so that a converted model starts from the same weights as its reference.
    """
    if not std > 0 or not bound > 0:
        raise ValueError(f"trunc_normal_ needs std > 0 and bound > 0, got std={std}, bound={bound}")
    if tensor.is_meta:
        return tensor
    low, high = mean - bound * std, mean + bound * std
    if _is_dtensor(tensor):
        return nn.init.trunc_normal_(tensor, mean=mean, std=std, a=low, b=high)
    # The bounds as the tensor's dtype represents them, so that no stored value lies outside.
    low = tensor.new_tensor(low, device="cpu").item()
    high = tensor.new_tensor(high, device="cpu").item()
    work = tensor if tensor.dim() else tensor.unsqueeze(0)  # a view: writes reach ``tensor``
    work.normal_(mean, std)
    rejected = ((work < low) | (work > high)).nonzero(as_tuple=True)
    while rejected[0].numel():
        draws = work.new_empty(rejected[0].numel()).normal_(mean, std)
        work.index_put_(rejected, draws)
        still = (draws < low) | (draws > high)
        rejected = tuple(index[still] for index in rejected)
    return tensor


def _is_dtensor(tensor: torch.Tensor) -> bool:
    # No DTensor exists before torch.distributed.tensor is imported, and importing it
    # here would cost every single-device run its import (it pulls in sympy).
    dtensor_module = sys.modules.get("torch.distributed.tensor")
    return dtensor_module is not None and isinstance(tensor, dtensor_module.DTensor)
