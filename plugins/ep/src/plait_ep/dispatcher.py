"""All-to-all token dispatch: the (token, expert) rows of every rank go to the rank that
holds the expert, and the experts' outputs come back the same way.

With ``E`` experts over ``ep`` ranks, rank ``r`` holds experts ``r*L .. r*L+L-1``
(``L = E / ep``), the slice ``Shard(0)`` gives it. For the tokens of one micro-batch:

dispatch
    1. sort this rank's rows by expert id: the rows for rank 0's experts come first, then
       rank 1's, ... (``order``);
    2. exchange the per-expert row counts, so every rank knows how many rows it receives
       from each rank for each of its experts;
    3. ``all_to_all_single`` with uneven splits sends the rows (autograd-capable: the
       backward sends the gradients back the same way);
    4. the received rows arrive by source rank, then by expert: a stable sort by local
       expert (``regroup``) makes each local expert's rows contiguous.

combine undoes 4, then 3 (the reverse all-to-all), then 1, and sums every token's
expert outputs with its routing weights — the same arithmetic as the local dispatcher.
The routing itself (router, scores, top-k) stays on each rank, for its own tokens.

The exchanges (2 and 3 with 4; 4 and 3 of combine) are the opaque operators of
``plait_ep.exchange``, so that blocks compile with ``fullgraph=True``: the number of rows a
rank receives is data-dependent, an unbacked size in the traced graph.

On fake tensors outside a compiled region (``plait plan``) the counts have no values; the
dispatcher then assumes the perfectly balanced exchange, so the plan measures a balanced
step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor
from torch.distributed._functional_collectives import all_to_all_single_autograd

from plait.nn.moe import DispatchedTokens, Routing, TokenDispatcher
from plait_ep import exchange


@dataclass(kw_only=True, frozen=True)
class _Exchange:
    """What ``combine`` needs to invert one ``dispatch``."""

    order: torch.Tensor
    """Pair indices (``token * top_k + k``) sorted by expert: the rows as sent."""
    sent_counts: torch.Tensor
    """``[ranks, local experts]`` rows sent to each expert of each rank."""
    received_counts: torch.Tensor
    """``[ranks, local experts]`` rows received from each rank for each local expert."""


@dataclass(kw_only=True, frozen=True)
class _BalancedExchange:
    """``combine``'s state on fake tensors (``plait plan``): even splits, no regrouping."""

    order: torch.Tensor
    splits: list[int]


def _wait(tensor: torch.Tensor) -> torch.Tensor:
    """The result of a functional collective, waited for (a plain tensor)."""
    wait = getattr(tensor, "wait", None)
    return wait() if wait is not None else tensor


class AllToAllTokenDispatcher(TokenDispatcher):
    """``TokenDispatcher`` for experts sharded on dim 0 over the ranks of ``group``."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        # Plain values, read once: a compiled block reads them as constants.
        self.group_name = group.group_name
        self.ranks = dist.get_world_size(group)

    def dispatch(self, tokens: torch.Tensor, routing: Routing) -> DispatchedTokens:
        ranks = self.ranks
        num_experts = routing.tokens_per_expert.shape[0]
        if num_experts % ranks:
            raise ValueError(f"expert parallelism over {ranks} ranks cannot split {num_experts} experts evenly")
        local_experts = num_experts // ranks
        order = routing.experts.reshape(-1).argsort(stable=True)
        rows = tokens[order // routing.experts.shape[1]]  # one row per (token, expert) pair, by expert
        if not torch.compiler.is_compiling() and isinstance(tokens, FakeTensor):
            return self._dispatch_balanced(rows, routing, order)

        sent_counts = routing.tokens_per_expert.view(ranks, local_experts)
        received_counts = exchange.exchange_counts(sent_counts, self.group_name)  # [source rank, local expert]
        received = exchange.send_rows(rows, sent_counts, received_counts, self.group_name, None)
        return DispatchedTokens(
            tokens=received,
            tokens_per_expert=received_counts.sum(dim=0),
            state=_Exchange(order=order, sent_counts=sent_counts, received_counts=received_counts),
        )

    def _dispatch_balanced(self, rows: torch.Tensor, routing: Routing, order: torch.Tensor) -> DispatchedTokens:
        """On fake tensors (``plait plan``) the routing has no values: assume the perfectly
        balanced exchange, every rank sending every rank (and expert) as many rows."""
        pairs = rows.shape[0]
        splits = [pairs // self.ranks + (rank < pairs % self.ranks) for rank in range(self.ranks)]
        received = _wait(all_to_all_single_autograd(rows, splits, splits, self.group))
        local_experts = routing.tokens_per_expert.shape[0] // self.ranks
        return DispatchedTokens(
            tokens=received,
            tokens_per_expert=routing.tokens_per_expert.view(self.ranks, local_experts).sum(dim=0),
            state=_BalancedExchange(order=order, splits=splits),
        )

    def combine(self, expert_outputs: torch.Tensor, dispatched: DispatchedTokens, routing: Routing) -> torch.Tensor:
        state = dispatched.state
        tokens, top_k = routing.experts.shape
        if isinstance(state, _BalancedExchange):
            returned = _wait(all_to_all_single_autograd(expert_outputs, state.splits, state.splits, self.group))
        else:
            returned = exchange.return_rows(
                expert_outputs, state.sent_counts, state.received_counts, self.group_name, state.order.shape[0]
            )
        per_pair = torch.empty_like(returned).index_copy(0, state.order, returned)
        weights = routing.weights.to(expert_outputs.dtype).unsqueeze(-1)
        return (per_pair.view(tokens, top_k, -1) * weights).sum(dim=1)
