"""Tensor parallelism of qwen3's per-head query and key norms.

The tp plugin shards ``wq``/``wk``/``wv`` column-wise, so each rank holds some of the
heads of ``q`` and ``k``. The RMSNorm over each head's features computes the same on
every rank (its weight is replicated), but the gradient of its weight sums over all
heads, so each rank holds only a part of it. The norms therefore run on DTensors marked
as sharded over the heads (dim 2): DTensor sums the weight gradient over the tp ranks,
and the weights are DTensors like every other parameter of a tp run (foreach and fused
AdamW need that).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module

from plait.nn import Attention

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

HEAD_DIM = 2  # q and k are [batch, seq, heads, head_dim] when they reach the norms


def _replicate_parameters(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
    for param_name, param in list(module.named_parameters(recurse=False)):
        replicated = DTensor.from_local(param, mesh, [Replicate()], run_check=False)
        module.register_parameter(param_name, nn.Parameter(replicated, requires_grad=param.requires_grad))


def _heads_sharded(module: nn.Module, inputs: tuple[Any, ...], mesh: DeviceMesh) -> tuple[Any, ...]:
    (x,) = inputs
    return (DTensor.from_local(x, mesh, [Shard(HEAD_DIM)], run_check=False),)


def _local(module: nn.Module, output: DTensor, mesh: DeviceMesh) -> Any:
    return output.to_local()


def parallelize_head_norms(model: nn.Module, tp_mesh: DeviceMesh) -> int:
    """Prepare every ``q_norm``/``k_norm`` of ``model`` for head-sharded inputs; returns how many."""
    attentions = [m for m in model.modules() if isinstance(m, Attention) and m.q_norm is not None]
    norms = [norm for attention in attentions for norm in (attention.q_norm, attention.k_norm)]
    for norm in norms:
        distribute_module(norm, tp_mesh, _replicate_parameters, _heads_sharded, _local)
    return len(norms)
