"""Token dispatch through DeepEP's buffer, behind plait's ``TokenDispatcher`` interface.

DeepEP moves each token once to every rank that holds one of its experts (not once per
expert, as a plain all-to-all of (token, expert) rows does), and sums the returned
outputs per token without weights. So, on the receiving rank:

dispatch
    ``buffer.dispatch`` returns the received tokens ``[R, dim]`` and, for each, its top-k
    expert ids as local ids (``-1`` where the expert lives elsewhere) and weights; every
    (received token, local expert) pair becomes one row, the rows sorted by local expert.
combine
    every row's output times its routing weight is added into its received token, and
    ``buffer.combine`` sends the tokens home and sums them there.

Neither DeepEP call is differentiable; two autograd functions give them backwards: the
gradient of a dispatch is a combine of the gradients (with the weights' gradients
reduced alongside), the gradient of a combine is a dispatch that reuses the layout
(``handle``) of the forward.

The buffer is anything with DeepEP's ``get_dispatch_layout`` / ``dispatch`` / ``combine``
signatures: ``deep_ep.Buffer`` on GPUs, a gloo stand-in in the tests. It is made on the
first dispatch, when the token size (which sizes DeepEP's buffers) is known.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from plait.nn.moe import DispatchedTokens, Routing, TokenDispatcher


@dataclass(kw_only=True)
class _Exchange:
    """One dispatch's layout, for its combine and for both backwards."""

    handle: Any = None
    rows: torch.Tensor | None = None
    """Received-token index of every expert row."""
    slots: torch.Tensor | None = None
    """Top-k slot of every expert row (which of the token's weights applies)."""
    received_weights: torch.Tensor | None = None
    """``[R, top_k]`` routing weights of the received tokens."""
    pending: list[Any] = field(default_factory=list)
    """Events of combines still in flight."""


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tokens: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                buffer: Any, num_experts: int, exchange: _Exchange) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        per_rank, per_rdma_rank, per_expert, in_rank, _event = buffer.get_dispatch_layout(experts, num_experts)
        received, received_experts, received_weights, _counts, handle, _event = buffer.dispatch(
            tokens,
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=experts,
            topk_weights=weights,
        )
        exchange.handle = handle
        ctx.buffer, ctx.exchange = buffer, exchange
        ctx.mark_non_differentiable(received_experts)
        return received, received_weights, received_experts

    @staticmethod
    def backward(ctx: Any, grad_received: torch.Tensor, grad_weights: torch.Tensor | None, _grad_experts: Any):
        if grad_weights is None:
            grad_weights = torch.zeros_like(ctx.exchange.received_weights)
        grad_tokens, grad_token_weights, _event = ctx.buffer.combine(
            grad_received.contiguous(), ctx.exchange.handle, topk_weights=grad_weights.contiguous()
        )
        return grad_tokens, grad_token_weights, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, per_token: torch.Tensor, buffer: Any, exchange: _Exchange, overlap: bool) -> torch.Tensor:
        combined, _weights, event = buffer.combine(
            per_token, exchange.handle, async_finish=overlap, allocate_on_comm_stream=overlap
        )
        if overlap:
            exchange.pending.append(event)
        ctx.buffer, ctx.exchange = buffer, exchange
        return combined

    @staticmethod
    def backward(ctx: Any, grad_combined: torch.Tensor):
        grad_per_token = ctx.buffer.dispatch(grad_combined.contiguous(), handle=ctx.exchange.handle)[0]
        return grad_per_token, None, None, None


class DeepEPTokenDispatcher(TokenDispatcher):
    """``TokenDispatcher`` over a DeepEP buffer whose group holds the experts evenly,
    rank ``r`` experts ``r*L .. r*L+L-1`` (the ep plugin's ``Shard(0)``).

    ``wire_dtype`` is the dtype the tokens travel in (DeepEP's normal kernels take bf16);
    None keeps the input's. ``overlap_shared_experts`` runs the shared experts while the
    combine is in flight (an asynchronous combine on DeepEP's communication stream).
    """

    def __init__(self, make_buffer: Callable[[int], Any], *, ranks: int,
                 wire_dtype: torch.dtype | None = torch.bfloat16, overlap_shared_experts: bool = True) -> None:
        self.make_buffer = make_buffer
        """``make_buffer(bytes per token)`` -> the buffer."""
        self.buffer: Any = None
        self.ranks = ranks
        self.wire_dtype = wire_dtype
        self.overlap_shared_experts = overlap_shared_experts

    def dispatch(self, tokens: torch.Tensor, routing: Routing) -> DispatchedTokens:
        num_experts = routing.tokens_per_expert.shape[0]
        if num_experts % self.ranks:
            raise ValueError(f"DeepEP over {self.ranks} ranks cannot split {num_experts} experts evenly")
        local_experts = num_experts // self.ranks
        exchange = _Exchange()
        wire = tokens if self.wire_dtype is None else tokens.to(self.wire_dtype)
        if self.buffer is None:
            self.buffer = self.make_buffer(wire.shape[1] * wire.element_size())
        received, received_weights, received_experts = _Dispatch.apply(
            wire.contiguous(), routing.weights.float().contiguous(), routing.experts, self.buffer, num_experts, exchange
        )
        rows, slots = (received_experts >= 0).nonzero(as_tuple=True)
        local = received_experts[rows, slots]
        order = local.argsort(stable=True)
        exchange.rows, exchange.slots, exchange.received_weights = rows[order], slots[order], received_weights
        return DispatchedTokens(
            tokens=received[exchange.rows].to(tokens.dtype),
            tokens_per_expert=torch.bincount(local, minlength=local_experts),
            state=exchange,
        )

    def _combine(self, expert_outputs: torch.Tensor, dispatched: DispatchedTokens, *, overlap: bool) -> torch.Tensor:
        exchange: _Exchange = dispatched.state
        weights = exchange.received_weights[exchange.rows, exchange.slots].to(expert_outputs.dtype).unsqueeze(-1)
        received_tokens = exchange.received_weights.shape[0]
        per_token = expert_outputs.new_zeros(received_tokens, expert_outputs.shape[1])
        per_token = per_token.index_add(0, exchange.rows, expert_outputs * weights)
        if self.wire_dtype is not None:
            per_token = per_token.to(self.wire_dtype)
        return _Combine.apply(per_token, self.buffer, exchange, overlap)  # in the wire dtype

    def combine(self, expert_outputs: torch.Tensor, dispatched: DispatchedTokens, routing: Routing) -> torch.Tensor:
        return self._combine(expert_outputs, dispatched, overlap=False).to(expert_outputs.dtype)

    def combine_overlapped(
        self,
        expert_outputs: torch.Tensor,
        dispatched: DispatchedTokens,
        routing: Routing,
        overlapped: Callable[[], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.overlap_shared_experts:
            return super().combine_overlapped(expert_outputs, dispatched, routing, overlapped)
        exchange: _Exchange = dispatched.state
        combined = self._combine(expert_outputs, dispatched, overlap=True)
        side = overlapped()  # on the compute stream, while the combine runs on DeepEP's
        for event in exchange.pending:
            event.current_stream_wait()
        exchange.pending.clear()
        return combined.to(expert_outputs.dtype), side
