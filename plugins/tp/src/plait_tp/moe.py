"""Tensor parallelism of a mixture-of-experts layer (``plait.nn.MoE``): every expert's
hidden features are split over the tp ranks, like a dense feed-forward's.

Each tp rank holds, for every expert, the rows ``w1``/``w3`` and the columns ``w2`` of
its share of the hidden features (the same for the shared experts), and the whole
router. The layer:

1. gathers the tokens of the micro-batch (all-gather over the sequence with sequence
   parallelism; in the backward, the ranks' partial gradients are reduce-scattered, or
   all-reduced without it);
2. routes them: the same decision on every rank, made by the replicated router;
3. runs its shards of the experts: each rank's output is a partial sum;
4. sums the output over the ranks (reduce-scatter over the sequence, or all-reduce).

The routing weights' gradient comes from the partial outputs, so it is summed over the
ranks before it reaches the router (``TensorParallelRouting``); the router then
computes the full gradient on every rank, and its input gradient is divided by the tp
degree so that step 1's sum counts it once. The traffic per layer is that of a dense
tensor-parallel feed-forward plus one all-reduce of ``tokens × top_k`` routing weights.
The dispatcher stays local: every rank holds all experts (each in part).

With expert parallelism (which borrows the tp ranks: see ``ParallelDims``), the experts
are not split over tp: the ep plugin gives each rank whole experts. Steps 1, 2 and 4
stay; in step 3 each tp rank sends a different share of the tokens through the
all-to-all dispatcher and leaves zeros for the others' tokens, so its output is again a
partial sum of the layer's output. The shared experts are split as above in both cases.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from plait.nn.moe import MoE, MoETensorParallel
from torch import nn
from torch.distributed.tensor import (
    DTensor,
    Partial,
    Replicate,
    Shard,
    distribute_tensor,
)

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def sum_gradient(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """``x`` unchanged; its gradient is summed over ``mesh`` in the backward (the local
    gradients are partial sums of the full one)."""
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


class TensorParallelRouting(MoETensorParallel):
    """``split_tokens``: each rank dispatches only its contiguous share of the tokens (the
    experts are held by expert parallelism, not split over the tp ranks)."""

    def __init__(self, mesh: DeviceMesh, *, split_tokens: bool) -> None:
        self.mesh = mesh
        self.split_tokens = split_tokens

    def router_input(self, tokens: torch.Tensor) -> torch.Tensor:
        return _ScaleGradient.apply(tokens, 1.0 / self.mesh.size())

    def routing_weights(self, weights: torch.Tensor) -> torch.Tensor:
        return sum_gradient(weights, self.mesh)

    def token_share(self, num_tokens: int) -> slice | None:
        if not self.split_tokens:
            return None
        ranks, rank = self.mesh.size(), self.mesh.get_local_rank()
        bounds = [num_tokens * r // ranks for r in range(ranks + 1)]
        return slice(bounds[rank], bounds[rank + 1])


def _distribute(module: nn.Module, name: str, mesh: DeviceMesh, placement: Shard | Replicate) -> None:
    param = getattr(module, name)
    if isinstance(param, DTensor):
        raise ValueError(
            f"MoE parameter {name!r} is already distributed ({param.placements}): tensor parallelism of a MoE "
            "layer expects plain tensors"
        )
    if isinstance(placement, Replicate):  # no broadcast: every rank builds the same (meta) tensor
        distributed = DTensor.from_local(param.detach(), mesh, [placement], run_check=False)
    else:
        distributed = distribute_tensor(param.detach(), mesh, [placement])
    module.register_parameter(name, nn.Parameter(distributed, requires_grad=param.requires_grad))


def parallelize_moe(moe: MoE, mesh: DeviceMesh, *, sequence_parallel: bool, expert_parallel: bool) -> None:
    """Prepare ``moe`` for tensor parallelism over ``mesh`` (in place): it gathers its
    input and sums its output over the tp ranks. The input arrives sequence-sharded (a
    ``Shard(1)`` DTensor from a sequence-parallel norm) or replicated; the output leaves
    as the local tensor of the same layout. Without ``expert_parallel`` the experts'
    hidden features are split over the ranks; with it, the ep plugin shards the experts
    and each tp rank dispatches its share of the tokens."""
    if not isinstance(moe, MoE):
        raise TypeError(f"the tp plan's 'moe' style applies to plait.nn.MoE layers, not {type(moe).__name__}")
    if not expert_parallel:
        experts = moe.experts
        for name, hidden_dim in (("w1", 1), ("w3", 1), ("w2", 2)):  # [experts, hidden, dim] / [experts, dim, hidden]
            _distribute(experts, name, mesh, Shard(hidden_dim))
    if moe.shared_experts is not None:
        shared = moe.shared_experts
        for linear, hidden_dim in ((shared.w1, 0), (shared.w3, 0), (shared.w2, 1)):
            _distribute(linear, "weight", mesh, Shard(hidden_dim))
    _distribute(moe.router.gate, "weight", mesh, Replicate())
    moe.tensor_parallel = TensorParallelRouting(mesh, split_tokens=expert_parallel)
    output_layout = Shard(1) if sequence_parallel else Replicate()

    def gather_tokens(module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        x, *rest = inputs
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, [Shard(1) if sequence_parallel else Replicate()], run_check=False)
        return (x.redistribute(placements=[Replicate()]).to_local(grad_placements=[Partial()]), *rest)

    def sum_outputs(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        partial = DTensor.from_local(output, mesh, [Partial()], run_check=False)
        return partial.redistribute(placements=[output_layout]).to_local()

    moe.register_forward_pre_hook(gather_tokens)
    moe.register_forward_hook(sum_outputs)
