"""The DeepSeek-V3 decoder: token embedding, ``n_layers`` pre-norm blocks, final norm, LM head.

Every block is multi-head latent attention (``plait_deepseek_v3.attention``) followed by a
dense SwiGLU feed-forward in the first ``n_dense_layers`` blocks and by the core's
mixture of experts (``plait.nn.MoE``) in the others: sigmoid (or softmax) scores,
group-limited top-k routing, a load-balancing bias on the choice, normalized and scaled
weights, and shared experts. The multi-token-prediction modules of the published model
are not part of it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from plait.errors import ConfigError
from plait.nn import DecoderStack, FeedForward, MoE, MoEArgs, PreNormBlock, RMSNorm, trunc_normal_
from plait_deepseek_v3.attention import MultiHeadLatentAttention
from plait_deepseek_v3.rope import Yarn, rope_table


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelArgs:
    """DeepSeek-V3 hyperparameters. Frozen: derive variants with ``dataclasses.replace``."""

    dim: int = 7168
    n_layers: int = 61
    n_dense_layers: int = 3
    """The first blocks use a dense feed-forward instead of experts (HF ``first_k_dense_replace``)."""
    n_heads: int = 128
    vocab_size: int = 129280
    inter_dim: int = 18432
    """Width of the dense SwiGLU of the first ``n_dense_layers`` blocks."""
    moe: MoEArgs = MoEArgs(
        num_experts=256, top_k=8, hidden_dim=2048, num_shared_experts=1, score_func="sigmoid",
        num_groups=8, topk_groups=4, normalize_weights=True, route_scale=2.5, gate_in_float32=True,
    )  # fmt: skip
    """The experts of the other blocks (``hidden_dim`` is DeepSeek's ``moe_inter_dim``)."""
    q_lora_rank: int = 1536
    """Rank of the query bottleneck; 0 projects the queries with one plain ``wq``."""
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    original_seq_len: int = 4096
    """Context of pretraining; YaRN applies when ``max_seq_len`` exceeds it."""
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    max_seq_len: int = 4096
    """Longest sequence the RoPE table covers (the trainer sets it to the run's seq_len)."""

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def yarn(self) -> Yarn | None:
        """The YaRN stretch, when the model runs past its pretraining context; else None."""
        if self.max_seq_len <= self.original_seq_len or self.rope_factor <= 1:
            return None
        return Yarn(
            factor=self.rope_factor, original_seq_len=self.original_seq_len,
            beta_fast=self.beta_fast, beta_slow=self.beta_slow, mscale=self.mscale,
        )  # fmt: skip

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim ** -0.5``, times YaRN's ``mscale ** 2`` when YaRN applies."""
        scale = self.qk_head_dim**-0.5
        yarn = self.yarn
        return scale if yarn is None else scale * yarn.softmax_mscale**2

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    def __post_init__(self) -> None:
        if not 0 <= self.n_dense_layers <= self.n_layers:
            raise ConfigError(
                f"deepseek_v3: n_dense_layers ({self.n_dense_layers}) must be between 0 and n_layers ({self.n_layers})"
            )
        if self.q_lora_rank < 0 or self.kv_lora_rank < 1:
            raise ConfigError(
                f"deepseek_v3: q_lora_rank ({self.q_lora_rank}) must be >= 0 and kv_lora_rank "
                f"({self.kv_lora_rank}) positive"
            )
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim < 2:
            raise ConfigError(
                f"deepseek_v3: qk_rope_head_dim ({self.qk_rope_head_dim}) must be even and positive for RoPE"
            )


def _attention_parameters(args: ModelArgs) -> int:
    query_width = args.n_heads * args.qk_head_dim
    if args.q_lora_rank:
        queries = args.dim * args.q_lora_rank + args.q_lora_rank + args.q_lora_rank * query_width
    else:
        queries = args.dim * query_width
    keys_values = (
        args.dim * (args.kv_lora_rank + args.qk_rope_head_dim)
        + args.kv_lora_rank
        + args.kv_lora_rank * args.n_heads * (args.qk_nope_head_dim + args.v_head_dim)
    )
    return queries + keys_values + args.n_heads * args.v_head_dim * args.dim


def count_parameters(args: ModelArgs, *, include_embedding: bool = True, active_only: bool = False) -> int:
    """Parameters counted from the args (the LM head is not an embedding). ``active_only``
    counts the experts one token uses: ``top_k`` routed ones plus the shared ones."""
    moe = args.moe
    routed = moe.top_k if active_only else moe.num_experts
    expert_ffn = 3 * args.dim * moe.hidden_dim * (routed + moe.num_shared_experts) + args.dim * moe.num_experts
    per_block = _attention_parameters(args) + 2 * args.dim
    total = (
        args.n_layers * per_block
        + args.n_dense_layers * 3 * args.dim * args.inter_dim
        + args.n_moe_layers * expert_ffn
        + args.dim  # final norm
        + args.vocab_size * args.dim  # LM head
    )
    if include_embedding:
        total += args.vocab_size * args.dim
    return total


class TransformerBlock(PreNormBlock):
    """Pre-norm block; its second half is ``feed_forward`` (the first ``n_dense_layers``) or ``moe``."""

    def __init__(self, layer_id: int, args: ModelArgs) -> None:
        dense = layer_id < args.n_dense_layers
        super().__init__(
            layer_id=layer_id,
            dim=args.dim,
            norm_eps=args.norm_eps,
            attention=MultiHeadLatentAttention(args),
            feed_forward=FeedForward(dim=args.dim, hidden_dim=args.inter_dim) if dense else None,
            moe=None if dense else MoE(dim=args.dim, args=args.moe),
        )


class Transformer(DecoderStack):
    """The DeepSeek-V3 decoder (``plait.nn.DecoderStack``)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(args.dim, eps=args.norm_eps)
        self.output: nn.Linear | None = nn.Linear(args.dim, args.vocab_size, bias=False)
        rope_shape = (args.max_seq_len, 2 * args.qk_rope_head_dim)
        self.register_buffer("rope_cache", torch.empty(rope_shape, dtype=torch.float32), persistent=False)

    def init_weights(self) -> None:
        """Initialize every parameter and buffer from the global torch RNG (call under no_grad)."""
        args = self.args
        self.rope_cache.copy_(
            rope_table(args.qk_rope_head_dim, args.max_seq_len, theta=args.rope_theta, yarn=args.yarn,
                       device=self.rope_cache.device)
        )  # fmt: skip
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=1.0)
        for layer in self.layers.values():
            layer.init_weights()
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None:
            std = args.dim**-0.5
            trunc_normal_(self.output.weight, std=std)
