"""Expert sharding: every parameter of an expert module (3-D weights, experts on dim 0)
becomes a DTensor ``Shard(0)`` on the ep mesh, so each ep rank holds ``num_experts / ep``
experts of every MoE layer. Checkpoints store the full tensors (DCP), so they load under
any ep degree and in one process.

The model spec names the expert modules with patterns (``layers.*.moe.experts``, ``*``
is one path component); the fsdp plugin later shards these same parameters over the
``efsdp`` mesh, the ranks that hold the same experts.
"""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Iterable

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard


def pattern_matches(pattern: str, path: str) -> bool:
    pattern_parts, path_parts = pattern.split("."), path.split(".")
    return len(pattern_parts) == len(path_parts) and all(
        fnmatchcase(part, wanted) for part, wanted in zip(path_parts, pattern_parts)
    )


def expert_modules(model: nn.Module, patterns: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of the modules of ``model`` that match one of ``patterns``."""
    patterns = tuple(patterns)
    return [
        (path, module)
        for path, module in model.named_modules()
        if path and any(pattern_matches(pattern, path) for pattern in patterns)
    ]


def experts_per_module(module: nn.Module) -> int:
    """How many experts a module stacks: the common first dimension of its parameters."""
    sizes = {param.shape[0] for param in module.parameters(recurse=False)}
    if len(sizes) != 1:
        raise ValueError(f"expert parameters must share their first (expert) dimension, got sizes {sorted(sizes)}")
    return sizes.pop()


def shard_experts(module: nn.Module, mesh: DeviceMesh) -> None:
    """Replace each parameter of ``module`` by its ``Shard(0)`` slice on ``mesh``, in place
    (on the meta device too: no communication, each rank keeps its own slice)."""
    ranks, rank = mesh.size(), mesh.get_local_rank()
    for name, param in list(module.named_parameters(recurse=False)):
        if isinstance(param, DTensor):
            raise ValueError(f"expert parameter {name!r} is already distributed ({param.placements}); "
                             "expert parallelism expects plain tensors")
        local = param.detach().chunk(ranks, dim=0)[rank].clone()  # free the full tensor
        sharded = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=param.shape, stride=param.stride())
        module.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
