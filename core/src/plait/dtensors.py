"""Recognizing DTensors without importing their module.

``torch.distributed.tensor`` pulls in sympy and costs a single-device run about half a
second and 40 MiB at start; no DTensor can exist before something else imported it.
"""
from __future__ import annotations

import sys

import torch


def is_dtensor(tensor: torch.Tensor) -> bool:
    dtensor_module = sys.modules.get("torch.distributed.tensor")
    return dtensor_module is not None and isinstance(tensor, dtensor_module.DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard; any other tensor as it is."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (a collective: every rank of its mesh calls it); any other
    tensor as it is."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor
