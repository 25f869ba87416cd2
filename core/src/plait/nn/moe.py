"""Mixture of experts: a top-k router, SwiGLU experts stored as 3-D weights, a pluggable
token dispatcher, and the load-balancing state the trainer updates between steps.

One MoE layer, for the tokens ``x`` of a micro-batch:

1. the router scores every expert (softmax or sigmoid of ``x @ gate.T``), adds the
   load-balancing bias for the choice only, optionally restricts the choice to the best
   groups of experts, and picks ``top_k`` experts per token, weighted by their scores;
2. the dispatcher groups the (token, expert) pairs by expert; the local dispatcher keeps
   them in this process, the ep plugin's sends them to the ranks that hold the experts;
3. the experts run as grouped matmuls (``torch._grouped_mm``) or as a loop over experts;
4. the dispatcher brings the outputs back in token order and sums them, weighted;
5. the shared experts, if any, add their dense output.

Load balancing. Each layer counts the tokens routed to every expert during a training
step (``tokens_per_expert``). After the optimizer step the trainer calls
``finish_moe_step``: it sums the counts over the data-parallel ranks, moves the
``expert_bias`` of every layer by ``rate * sign(mean load - expert load)`` (aux-loss-free
balancing, DeepSeek-V3) and reports the balance as metrics. Both the update and the
metrics depend only on the ratios of the counts, so a forward that activation
checkpointing recomputes (which counts its tokens twice) changes neither. An auxiliary
balance loss (``load_balance_loss``) can be added to the training loss as well.
"""
from __future__ import annotations

import abc
import contextlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from plait.dtensors import local_tensor
from plait.errors import ConfigError
from plait.nn.feed_forward import FeedForward
from plait.nn.init import trunc_normal_

ScoreFunction = Literal["softmax", "sigmoid"]
AuxLossType = Literal["sequence", "batch"]
ExpertImplementation = Literal["auto", "grouped_mm", "loop"]


@dataclass(kw_only=True, slots=True, frozen=True)
class MoEArgs:
    """Shape and routing rule of a mixture-of-experts layer."""

    num_experts: int
    top_k: int
    hidden_dim: int
    """SwiGLU width of each routed expert."""
    num_shared_experts: int = 0
    """Experts every token goes through; together one SwiGLU of width ``num_shared_experts * hidden_dim``."""
    score_func: ScoreFunction = "softmax"
    num_groups: int = 1
    """The experts form this many equal groups (e.g. one per node)."""
    topk_groups: int = 1
    """With ``num_groups > 1``: each token chooses among the experts of its ``topk_groups``
    best groups only, a group scoring the sum of its two best experts (DeepSeek-V3)."""
    normalize_weights: bool = False
    """Divide each token's top-k weights by their sum."""
    route_scale: float = 1.0
    """Multiplies the routing weights (DeepSeek's routed scaling factor)."""
    gate_in_float32: bool = False
    """Compute the gate's logits in float32 whatever the compute dtype (DeepSeek-V3 does);
    else in the compute dtype (bf16 under mixed precision), as Qwen3-MoE does."""

    def __post_init__(self) -> None:
        if self.num_experts < 1 or self.hidden_dim < 1:
            raise ConfigError(
                f"MoE: num_experts ({self.num_experts}) and hidden_dim ({self.hidden_dim}) must be positive"
            )
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"MoE: top_k ({self.top_k}) must be between 1 and num_experts ({self.num_experts})")
        if self.num_shared_experts < 0:
            raise ConfigError(f"MoE: num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if self.num_groups < 1 or self.num_experts % self.num_groups:
            raise ConfigError(
                f"MoE: num_groups ({self.num_groups}) must be positive and divide num_experts ({self.num_experts})"
            )
        if self.num_groups > 1:
            if not 1 <= self.topk_groups <= self.num_groups:
                raise ConfigError(
                    f"MoE: topk_groups ({self.topk_groups}) must be between 1 and num_groups ({self.num_groups})"
                )
            if self.top_k > self.topk_groups * self.experts_per_group:
                raise ConfigError(
                    f"MoE: top_k ({self.top_k}) exceeds the {self.topk_groups * self.experts_per_group} experts "
                    f"of the topk_groups ({self.topk_groups}) groups a token may choose from"
                )

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.num_groups

    @property
    def group_limited(self) -> bool:
        return self.num_groups > 1 and self.topk_groups < self.num_groups


def _local(weight: torch.Tensor) -> torch.Tensor:
    """This rank's part of a weight: expert parallelism shards the experts (dim 0) and
    tensor parallelism their hidden features, as DTensors; a MoE layer computes with the
    local shards and leaves the exchanges to its dispatcher and ``tensor_parallel``."""
    return local_tensor(weight)


# --------------------------------------------------------------------------- routing


@dataclass(kw_only=True)
class Routing:
    """The router's decision for ``T`` tokens."""

    experts: torch.Tensor
    """``[T, top_k]`` int64 expert ids, best first."""
    weights: torch.Tensor
    """``[T, top_k]`` float32 weights of the experts' outputs."""
    scores: torch.Tensor
    """``[T, num_experts]`` float32 scores of every expert, without the bias (for the auxiliary loss)."""
    tokens_per_expert: torch.Tensor
    """``[num_experts]`` int64: how many of these tokens chose each expert."""


def count_tokens_per_expert(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[num_experts]`` int64 occurrences of each id in ``experts`` (static shape, compile-friendly)."""
    flat = experts.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def _keep_best_groups(choice: torch.Tensor, args: MoEArgs) -> torch.Tensor:
    """``choice`` with the experts outside each token's ``topk_groups`` best groups set to -inf."""
    tokens = choice.shape[0]
    grouped = choice.view(tokens, args.num_groups, args.experts_per_group)
    group_scores = grouped.topk(min(2, args.experts_per_group), dim=-1).values.sum(dim=-1)
    best_groups = group_scores.topk(args.topk_groups, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
    return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(tokens, args.num_experts)


def _autocast_off(device_type: str) -> Any:
    if device_type == "meta":  # shape tracing: autocast has no meta backend
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


class TopKRouter(nn.Module):
    """Scores the experts for each token and picks ``top_k`` of them.

    The bias (if given) shifts the scores for the choice only; the weights are the
    unbiased scores of the chosen experts, optionally normalized to sum to one, times
    ``route_scale``. Scores are computed in float32 (the logits too with
    ``gate_in_float32``). Under tensor parallelism the gate weight is a replicated
    DTensor; the router computes with its local copy.
    """

    def __init__(self, *, dim: int, args: MoEArgs) -> None:
        super().__init__()
        self.args = args
        self.gate = nn.Linear(dim, args.num_experts, bias=False)

    def forward(self, tokens: torch.Tensor, expert_bias: torch.Tensor | None = None) -> Routing:
        args = self.args
        weight = _local(self.gate.weight)
        if args.gate_in_float32:
            with _autocast_off(tokens.device.type):
                logits = F.linear(tokens.float(), weight.float())
        else:
            logits = F.linear(tokens, weight).float()
        scores = logits.softmax(dim=-1) if args.score_func == "softmax" else logits.sigmoid()
        choice = scores if expert_bias is None else scores + expert_bias.float()
        if args.group_limited:
            choice = _keep_best_groups(choice, args)
        experts = choice.topk(args.top_k, dim=-1).indices
        weights = scores.gather(-1, experts)
        if args.normalize_weights:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if args.route_scale != 1.0:
            weights = weights * args.route_scale
        return Routing(
            experts=experts,
            weights=weights,
            scores=scores,
            tokens_per_expert=count_tokens_per_expert(experts, args.num_experts),
        )


# --------------------------------------------------------------------------- dispatch


@dataclass(kw_only=True)
class DispatchedTokens:
    """What a dispatcher hands to the experts of this rank."""

    tokens: torch.Tensor
    """``[rows, dim]``: one row per (token, expert) pair, grouped by expert, this rank's first expert first."""
    tokens_per_expert: torch.Tensor
    """``[local experts]`` int64 rows of each expert; they sum to ``rows``."""
    state: Any = None
    """Whatever the dispatcher's ``combine`` needs (permutations, split sizes)."""


class TokenDispatcher(abc.ABC):
    """Moves (token, expert) pairs to the experts and their outputs back.

    ``MoE`` calls ``dispatch``, runs its local experts on the grouped rows, then
    ``combine``. ``LocalTokenDispatcher`` keeps everything in this process; expert
    parallelism (plugin ep, or deepep) supplies one that exchanges the rows between the
    ranks, through the ``plait_token_dispatcher`` hook. Under expert parallelism the
    expert weights are sharded on their first dimension and ``GroupedExperts`` computes
    with the local shard, so ``tokens_per_expert`` counts this rank's experts only.
    """

    @abc.abstractmethod
    def dispatch(self, tokens: torch.Tensor, routing: Routing) -> DispatchedTokens:
        """Group the rows of ``tokens`` ``[T, dim]`` by the experts ``routing`` chose."""

    @abc.abstractmethod
    def combine(self, expert_outputs: torch.Tensor, dispatched: DispatchedTokens, routing: Routing) -> torch.Tensor:
        """``[T, dim]``: for every token, the sum over its experts of weight × expert output."""

    def combine_overlapped(
        self,
        expert_outputs: torch.Tensor,
        dispatched: DispatchedTokens,
        routing: Routing,
        overlapped: Callable[[], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``combine`` and ``overlapped()`` (the shared experts); a dispatcher whose exchange
        runs asynchronously computes the latter while the former is in flight."""
        return self.combine(expert_outputs, dispatched, routing), overlapped()


class LocalTokenDispatcher(TokenDispatcher):
    """All experts live in this process: a stable sort by expert id and its inverse."""

    def dispatch(self, tokens: torch.Tensor, routing: Routing) -> DispatchedTokens:
        top_k = routing.experts.shape[1]
        order = routing.experts.reshape(-1).argsort(stable=True)  # pair index, grouped by expert
        return DispatchedTokens(tokens=tokens[order // top_k], tokens_per_expert=routing.tokens_per_expert, state=order)

    def combine(self, expert_outputs: torch.Tensor, dispatched: DispatchedTokens, routing: Routing) -> torch.Tensor:
        tokens, top_k = routing.experts.shape
        order = dispatched.state
        per_pair = torch.empty_like(expert_outputs).index_copy(0, order, expert_outputs)
        weights = routing.weights.to(expert_outputs.dtype).unsqueeze(-1)
        return (per_pair.view(tokens, top_k, -1) * weights).sum(dim=1)


@dataclass(kw_only=True)
class AlignedGroups:
    """Rows grouped by expert, each group padded with zero rows to a multiple of the
    alignment (``MoE.group_alignment``), for expert kernels that quantize blocks of rows."""

    tokens: torch.Tensor
    """``[padded rows, dim]``; rows past the last group are zeros too."""
    tokens_per_expert: torch.Tensor
    """``[experts]`` padded rows of each group (multiples of the alignment, summing to the
    padded rows: the slack at the end counts as the last expert's)."""
    positions: torch.Tensor
    """``[rows]`` where each original row went."""


def align_token_groups(tokens: torch.Tensor, tokens_per_expert: torch.Tensor, alignment: int) -> AlignedGroups:
    """Pad each expert's group of ``tokens`` (grouped by expert, ``tokens_per_expert`` rows
    each) to a multiple of ``alignment``. The padded size is the static bound
    ``round_up(rows + experts * (alignment - 1), alignment)``: no host sync, compile-friendly.
    The zero rows give zero outputs and add nothing to the gradients."""
    rows, experts = tokens.shape[0], tokens_per_expert.shape[0]
    padded_rows = -(-(rows + experts * (alignment - 1)) // alignment) * alignment
    counts = tokens_per_expert.to(torch.int64)
    padded_counts = (counts + alignment - 1) // alignment * alignment
    starts = torch.cumsum(counts, 0) - counts
    padded_starts = torch.cumsum(padded_counts, 0) - padded_counts
    expert_of_row = torch.repeat_interleave(torch.arange(experts, device=tokens.device), counts, output_size=rows)
    positions = torch.arange(rows, device=tokens.device) + (padded_starts - starts)[expert_of_row]
    padded = tokens.new_zeros(padded_rows, tokens.shape[1]).index_copy(0, positions, tokens)
    slack = padded_rows - padded_counts.sum()
    padded_counts = torch.cat([padded_counts[:-1], padded_counts[-1:] + slack])
    return AlignedGroups(tokens=padded, tokens_per_expert=padded_counts, positions=positions)


# --------------------------------------------------------------------------- experts


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: the backward of
    ``torch._grouped_mm`` refuses stride-0 gradients, such as ``out.sum()`` produces."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _grouped_linear(rows: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``rows`` of group g times ``weight[g].T`` (linear layout ``[groups, out, in]``)."""
    return _ContiguousGrad.apply(torch._grouped_mm(rows, weight.transpose(-2, -1), offs=offsets))


def grouped_expert_swiglu(
    tokens: torch.Tensor, tokens_per_expert: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor
) -> torch.Tensor:
    """SwiGLU of every expert on its rows of ``tokens``, as three grouped matmuls."""
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
    hidden = F.silu(_grouped_linear(tokens, w1, offsets)) * _grouped_linear(tokens, w3, offsets)
    return _grouped_linear(hidden, w2, offsets)


@torch.library.custom_op("plait::looped_expert_swiglu", mutates_args=())
def looped_expert_swiglu(
    tokens: torch.Tensor, tokens_per_expert: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor
) -> torch.Tensor:
    """The same as ``grouped_expert_swiglu`` with plain matmuls, one expert at a time.

    An opaque operator (with the backward below), so that ``torch.compile`` traces
    through a layer that uses it: the split by expert depends on the data.
    """
    rows = tokens.split(tokens_per_expert.tolist())
    return torch.cat([_swiglu(x, w1[e], w2[e], w3[e]) for e, x in enumerate(rows)])


def _swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


@looped_expert_swiglu.register_fake
def _looped_expert_swiglu_shape(
    tokens: torch.Tensor, tokens_per_expert: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor
) -> torch.Tensor:
    return tokens.new_empty(tokens.shape[0], w2.shape[1])


@torch.library.custom_op("plait::looped_expert_swiglu_backward", mutates_args=())
def _looped_expert_swiglu_backward(
    grad: torch.Tensor,
    tokens: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``looped_expert_swiglu`` for tokens, w1, w2, w3 (the forward is recomputed):
    with ``a = x w1^T``, ``b = x w3^T``, ``h = silu(a) b``, ``y = h w2^T``."""
    grad_tokens = torch.empty_like(tokens)
    grad_w1, grad_w2, grad_w3 = torch.zeros_like(w1), torch.zeros_like(w2), torch.zeros_like(w3)
    start = 0
    for expert, count in enumerate(tokens_per_expert.tolist()):
        x, dy = tokens[start : start + count], grad[start : start + count]
        a, b = F.linear(x, w1[expert]), F.linear(x, w3[expert])
        sigmoid = torch.sigmoid(a)
        silu = a * sigmoid
        dh = dy @ w2[expert]
        da = dh * b * sigmoid * (1 + a * (1 - sigmoid))
        db = dh * silu
        grad_tokens[start : start + count] = da @ w1[expert] + db @ w3[expert]
        grad_w1[expert], grad_w2[expert], grad_w3[expert] = da.T @ x, dy.T @ (silu * b), db.T @ x
        start += count
    return grad_tokens, grad_w1, grad_w2, grad_w3


@_looped_expert_swiglu_backward.register_fake
def _looped_expert_swiglu_backward_shapes(
    grad: torch.Tensor,
    tokens: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(tokens), torch.empty_like(w1), torch.empty_like(w2), torch.empty_like(w3)


def _save_looped_inputs(ctx: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _looped_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    tokens, tokens_per_expert, w1, w2, w3 = ctx.saved_tensors
    grad_tokens, grad_w1, grad_w2, grad_w3 = _looped_expert_swiglu_backward(
        grad.contiguous(), tokens, tokens_per_expert, w1, w2, w3
    )
    return grad_tokens, None, grad_w1, grad_w2, grad_w3


looped_expert_swiglu.register_autograd(_looped_backward, setup_context=_save_looped_inputs)


def _compute_dtype(tokens: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer would compute in: autocast's, where it is on."""
    device_type = tokens.device.type
    if device_type != "meta" and torch.is_autocast_enabled(device_type):  # meta: shape tracing
        return torch.get_autocast_dtype(device_type)
    return tokens.dtype


class GroupedExperts(nn.Module):
    """``num_experts`` SwiGLU experts, weights stacked on dim 0 in linear layout:
    ``w1`` (gate) and ``w3`` (up) ``[E, hidden, dim]``, ``w2`` (down) ``[E, dim, hidden]``.

    ``implementation``: ``"grouped_mm"``, ``"loop"``, or ``"auto"``: grouped where the
    device runs it (``grouped_mm_available``: the device's ``grouped_mm`` capability, set
    by ``configure_moe_layers``; a CPU's answer by default) for the tokens' shapes (under
    ``torch.compile``: bf16 only), else the loop. Both compute the same.
    """

    def __init__(self, *, num_experts: int, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.implementation: ExpertImplementation = "auto"
        self.grouped_mm_available = True

    def forward(self, tokens: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``[rows, dim]`` grouped by expert, ``tokens_per_expert`` rows of each."""
        w1, w2, w3 = _local(self.w1), _local(self.w2), _local(self.w3)
        if tokens_per_expert.shape[0] != w1.shape[0]:
            raise ValueError(
                f"the dispatcher gave rows for {tokens_per_expert.shape[0]} experts, but this rank holds {w1.shape[0]}"
            )
        dtype = _compute_dtype(tokens)  # autocast does not cover _grouped_mm: apply its dtype here
        tokens, w1, w2, w3 = (t.to(dtype) for t in (tokens, w1, w2, w3))
        if self._use_grouped_mm(tokens, hidden_dim=w1.shape[1]):
            return grouped_expert_swiglu(tokens, tokens_per_expert, w1, w2, w3)
        return looped_expert_swiglu(tokens, tokens_per_expert, w1, w2, w3)

    def _use_grouped_mm(self, tokens: torch.Tensor, *, hidden_dim: int) -> bool:
        if self.implementation != "auto":
            return self.implementation == "grouped_mm"
        # Rows of 16-byte multiples, and bf16 when traced (torch.compile) or on fake or meta
        # tensors (plait plan): the rules of the CUDA kernel, which torch applies to its shape function.
        aligned = all(size * tokens.element_size() % 16 == 0 for size in (tokens.shape[-1], hidden_dim))
        if not (aligned and self.grouped_mm_available and hasattr(torch, "_grouped_mm")):
            return False
        traced = torch.compiler.is_compiling() or type(tokens) is not torch.Tensor or tokens.device.type == "meta"
        return tokens.dtype == torch.bfloat16 or not traced

    def init_weights(self, *, std: float, out_std: float) -> None:
        for weight, scale in ((self.w1, std), (self.w3, std), (self.w2, out_std)):
            trunc_normal_(weight, std=scale)


# --------------------------------------------------------------------------- balance loss


def load_balance_loss(routing: Routing, *, sequences: int | None = None, sequence_group: Any = None) -> torch.Tensor:
    """DeepSeek-V3's balance loss without its coefficient: ``sum_i f_i * P_i``, where
    ``f_i = N / (K * T) * (tokens that chose expert i)`` and ``P_i`` is the mean over the
    tokens of expert i's score normalized over all experts. It is 1 when every expert
    gets the same share of tokens and of probability; lower is impossible.

    ``sequences``: the tokens are that many equal-length sequences and the loss is taken
    per sequence, then averaged (sequence-wise); None takes it over all tokens (batch-wise).
    ``sequence_group``: the ranks that hold the other parts of these sequences (context
    parallelism); the token counts and score sums are summed over them, so every rank
    gets the loss of the whole sequences.
    """
    scores = routing.scores
    tokens, num_experts = scores.shape
    top_k = routing.experts.shape[1]
    groups = sequences or 1
    probabilities = (scores / scores.sum(dim=-1, keepdim=True)).view(groups, -1, num_experts)
    chosen = routing.experts.reshape(groups, -1)
    counts = torch.zeros(groups, num_experts, device=scores.device).scatter_add_(
        1, chosen, torch.ones_like(chosen, dtype=torch.float32)
    )
    probability_sums = probabilities.sum(dim=1)
    tokens_per_group = probabilities.shape[1]
    if sequence_group is not None:
        counts = _SumOverRanks.apply(counts, sequence_group)
        probability_sums = _SumOverRanks.apply(probability_sums, sequence_group)
        tokens_per_group *= torch.distributed.get_world_size(sequence_group)
    fraction = counts * num_experts / (top_k * tokens_per_group)
    return (fraction * probability_sums / tokens_per_group).sum(dim=-1).mean()


class _SumOverRanks(torch.autograd.Function):
    """Sum over the ranks of ``group``, in the forward and in the backward. Every rank
    then computes the same loss from the sums; the backward's sum makes each rank's
    gradient that of the whole loss, as the data-parallel mean over these ranks expects
    (it divides by them, as for a loss each rank takes over its own tokens)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return _all_reduce_sum(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce_sum(grad.contiguous(), ctx.group), None


def _all_reduce_sum(x: torch.Tensor, group: Any) -> torch.Tensor:
    from torch.distributed import _functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_reduce(x, "sum", group))


class _AddLossGradient(torch.autograd.Function):
    """Returns ``output`` unchanged; its backward also sends gradient 1 into ``loss``, as
    if ``loss`` were added to the training loss. Keeps the loss function, the pipeline
    schedules and the logged loss free of MoE details."""

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_dtype, ctx.loss_device = loss.dtype, loss.device
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, torch.ones((), dtype=ctx.loss_dtype, device=ctx.loss_device)


# --------------------------------------------------------------------------- tensor parallelism


class MoETensorParallel(abc.ABC):
    """How a MoE layer computes under tensor parallelism (the tp plugin supplies it, as
    ``MoE.tensor_parallel``).

    Every tp rank holds all tokens of the micro-batch and routes them identically. Each
    rank's routed output is then a partial sum, summed over the ranks by the tp plugin:
    either the experts' hidden features are split over the tp ranks (each rank runs its
    part of every expert on all tokens), or, when expert parallelism holds the experts,
    each tp rank sends only its share of the tokens (``token_share``) through the
    dispatcher and contributes zeros for the rest. The shared experts' hidden features
    are split over the tp ranks in both cases.

    In the backward the gradients each rank computes through its part are partial too,
    and the plugin sums them where the tokens enter the layer. Two paths need more: the
    routing weights multiply partial outputs, so their gradient is summed before the
    router sees it (``routing_weights``); the router then computes the same full
    gradient on every rank, so its input gradient must count once in that sum
    (``router_input``).
    """

    @abc.abstractmethod
    def router_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` unchanged; in the backward, its gradient divided by the tp degree."""

    @abc.abstractmethod
    def routing_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """``weights`` unchanged; in the backward, its gradient summed over the tp ranks."""

    def token_share(self, num_tokens: int) -> slice | None:
        """The tokens this rank dispatches to the experts; None: all of them."""
        return None


def _routing_of(routing: Routing, share: slice, num_experts: int) -> Routing:
    experts = routing.experts[share]
    return Routing(
        experts=experts,
        weights=routing.weights[share],
        scores=routing.scores[share],
        tokens_per_expert=count_tokens_per_expert(experts, num_experts),
    )


def _shared_experts_local(shared: FeedForward, tokens: torch.Tensor) -> torch.Tensor:
    """The shared experts with this rank's shards of their weights (tensor parallelism)."""
    return _swiglu(tokens, *(_local(linear.weight) for linear in (shared.w1, shared.w2, shared.w3)))


# --------------------------------------------------------------------------- the layer


class MoE(nn.Module):
    """``forward(x[B, S, dim]) -> [B, S, dim]``: routed experts plus optional shared experts.

    Training-time settings (plain attributes; ``configure_moe_layers`` sets them from
    the job config): ``dispatcher``, ``aux_loss_weight`` (the gradient weight of the
    auxiliary balance loss; 0 = off), ``aux_loss_type`` and ``sequence_group`` (the
    context-parallel ranks holding the rest of each sequence) and ``group_alignment``
    (whatever the dispatcher, each expert's group of rows is padded to a multiple of it
    before the experts: low-precision expert kernels quantize blocks of rows); the tp
    plugin sets ``tensor_parallel`` when it shards the experts' hidden features.

    Buffers: ``expert_bias`` (checkpointed; shifts the expert choice, moved between
    steps by ``finish_moe_step``), ``tokens_per_expert`` and ``aux_loss_total`` (this
    step's statistics; not checkpointed).
    """

    def __init__(self, *, dim: int, args: MoEArgs) -> None:
        super().__init__()
        self.args = args
        self.router = TopKRouter(dim=dim, args=args)
        self.experts = GroupedExperts(num_experts=args.num_experts, dim=dim, hidden_dim=args.hidden_dim)
        self.shared_experts = (
            FeedForward(dim=dim, hidden_dim=args.num_shared_experts * args.hidden_dim)
            if args.num_shared_experts
            else None
        )
        self.register_buffer("expert_bias", torch.zeros(args.num_experts, dtype=torch.float32))
        self.register_buffer("tokens_per_expert", torch.zeros(args.num_experts, dtype=torch.float32), persistent=False)
        #: [sum of the step's balance losses, number of them]
        self.register_buffer("aux_loss_total", torch.zeros(2, dtype=torch.float32), persistent=False)
        self.dispatcher: TokenDispatcher = LocalTokenDispatcher()
        self.tensor_parallel: MoETensorParallel | None = None
        self.aux_loss_weight = 0.0
        self.aux_loss_type: AuxLossType = "sequence"
        self.sequence_group: Any = None
        self.group_alignment = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, dim = x.shape
        tokens = x.reshape(-1, dim)
        tp = self.tensor_parallel
        routing = self.router(tokens if tp is None else tp.router_input(tokens), self.expert_bias)
        routed_tokens, routed = tokens, routing
        share = None if tp is None else tp.token_share(tokens.shape[0])
        if tp is not None:
            routing.weights = tp.routing_weights(routing.weights)
            if share is not None:
                routed_tokens, routed = tokens[share], _routing_of(routing, share, self.args.num_experts)
        dispatched = self.dispatcher.dispatch(routed_tokens, routed)
        if self.group_alignment > 1:
            aligned = align_token_groups(dispatched.tokens, dispatched.tokens_per_expert, self.group_alignment)
            expert_outputs = self.experts(aligned.tokens, aligned.tokens_per_expert)[aligned.positions]
        else:
            expert_outputs = self.experts(dispatched.tokens, dispatched.tokens_per_expert)
        if self.shared_experts is None:
            out, shared_out = self.dispatcher.combine(expert_outputs, dispatched, routed), None
        else:
            shared = self.shared_experts
            run_shared = (lambda: shared(tokens)) if tp is None else (lambda: _shared_experts_local(shared, tokens))
            out, shared_out = self.dispatcher.combine_overlapped(expert_outputs, dispatched, routed, run_shared)
        if share is not None:  # the other ranks' tokens contribute zeros to this rank's partial sum
            out = F.pad(out, (0, 0, share.start, tokens.shape[0] - share.stop))
        if shared_out is not None:
            out = out + shared_out
        out = out.view(batch, seq_len, dim)
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert.add_(routing.tokens_per_expert)
            if self.aux_loss_weight > 0:
                sequences = batch if self.aux_loss_type == "sequence" else None
                aux_loss = load_balance_loss(routing, sequences=sequences, sequence_group=self.sequence_group)
                with torch.no_grad():
                    self.aux_loss_total.add_(torch.stack([aux_loss.detach(), torch.ones_like(aux_loss)]))
                out = _AddLossGradient.apply(out, aux_loss * self.aux_loss_weight)
        return out

    def init_weights(self, *, std: float, out_std: float) -> None:
        trunc_normal_(self.router.gate.weight, std=std)
        self.experts.init_weights(std=std, out_std=out_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std=std, out_std=out_std)
        for buffer in (self.expert_bias, self.tokens_per_expert, self.aux_loss_total):
            buffer.zero_()


# --------------------------------------------------------------------------- trainer side


def moe_layers(model_parts: Iterable[nn.Module]) -> list[tuple[str, MoE]]:
    """``(label, layer)`` of every MoE layer, labelled ``layer{i}`` by the first number in
    its module path (``layers.3.moe`` -> ``layer3``), else by its path (``root`` for a
    model that is itself one MoE layer)."""
    found = []
    for part in model_parts:
        for path, module in part.named_modules():
            if isinstance(module, MoE):
                number = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
                found.append((f"layer{number.group(1)}" if number else path or "root", module))
    return found


def configure_moe_layers(
    model: nn.Module,
    *,
    aux_loss_coeff: float = 0.0,
    aux_loss_type: AuxLossType = "sequence",
    grad_accumulation_steps: int = 1,
    dispatcher: TokenDispatcher | None = None,
    sequence_group: Any = None,
    grouped_mm: bool = True,
    group_alignment: int = 1,
) -> int:
    """Apply a run's MoE settings to every MoE layer of ``model``; returns how many there are.

    The balance loss of each micro-batch gets the weight ``aux_loss_coeff /
    grad_accumulation_steps``, like the micro-batch's share of the training loss.
    ``dispatcher`` None keeps the local dispatcher. ``sequence_group``: the ranks that
    share each sequence (context parallelism), for the balance loss; None without.
    ``grouped_mm``: whether the device runs ``torch._grouped_mm`` (its capability).
    ``group_alignment``: pad each expert's rows to a multiple of it (``RunNeeds.moe_group_alignment``).
    """
    layers = moe_layers([model])
    for _, layer in layers:
        layer.aux_loss_weight = aux_loss_coeff / grad_accumulation_steps
        layer.aux_loss_type = aux_loss_type
        layer.sequence_group = sequence_group
        layer.experts.grouped_mm_available = grouped_mm
        layer.group_alignment = group_alignment
        if dispatcher is not None:
            layer.dispatcher = dispatcher
    return len(layers)


@dataclass(kw_only=True)
class MoEStepMetrics:
    """Routing balance of one step: a short summary and the per-layer breakdown."""

    summary: dict[str, float]
    per_layer: dict[str, float]


def finish_moe_step(
    model_parts: Iterable[nn.Module], *, bias_update_rate: float, group: Any = None
) -> MoEStepMetrics | None:
    """After an optimizer step: sum each layer's token counts over ``group`` (the
    data-parallel ranks, so that every replica makes the same update), move the expert
    biases by ``bias_update_rate * sign(mean load - expert load)``, report the balance
    and reset the counts. None when the model has no MoE layer.

    Metrics: ``moe/max_load_ratio`` (worst layer: most-loaded expert over the mean load;
    1 is perfect balance), ``moe/aux_loss`` (mean balance loss, when it is on) and
    ``moe/<layer>/max_load_ratio`` per layer. Under pipeline parallelism each rank
    reports the layers of its own stages.
    """
    layers = moe_layers(model_parts)
    if not layers:
        return None
    counts = torch.cat([layer.tokens_per_expert for _, layer in layers])
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(counts, group=group)
    per_layer_counts = counts.split([layer.args.num_experts for _, layer in layers])
    ratios = []
    with torch.no_grad():
        for (_, layer), layer_counts in zip(layers, per_layer_counts):
            mean = layer_counts.mean()
            if bias_update_rate > 0:
                layer.expert_bias.add_(bias_update_rate * torch.sign(mean - layer_counts))
            ratios.append(layer_counts.max() / mean.clamp(min=1e-12))
            layer.tokens_per_expert.zero_()
        aux_totals = torch.stack([layer.aux_loss_total for _, layer in layers])
        for _, layer in layers:
            layer.aux_loss_total.zero_()
    ratio_values = torch.stack(ratios).tolist()
    per_layer = {f"moe/{label}/max_load_ratio": value for (label, _), value in zip(layers, ratio_values)}
    summary = {"moe/max_load_ratio": max(ratio_values)}
    aux_sum, aux_count = aux_totals.sum(dim=0).tolist()
    if aux_count > 0:
        summary["moe/aux_loss"] = aux_sum / aux_count
    return MoEStepMetrics(summary=summary, per_layer=per_layer)
