"""The Qwen3 decoder: token embedding, ``n_layers`` pre-norm blocks, final norm, LM head.

Each block is attention with per-head RMSNorm on the queries and keys (before RoPE) and
an explicit ``head_dim``, followed by either a dense SwiGLU feed-forward or a
mixture-of-experts layer (``plait.nn.MoE``, softmax top-k routing).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from plait.errors import ConfigError
from plait.nn import (
    Attention,
    DecoderStack,
    FeedForward,
    MoE,
    MoEArgs,
    PreNormBlock,
    rope_cache,
)

AttentionMask = Literal["causal", "block_causal"]


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelArgs:
    """Qwen3 hyperparameters. Frozen: derive variants with ``dataclasses.replace``."""

    dim: int = 4096
    n_layers: int = 36
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    """Width of one attention head; ``n_heads * head_dim`` may differ from ``dim``."""
    vocab_size: int = 151936
    ffn_hidden_dim: int = 12288
    """Width of the dense SwiGLU (HF ``intermediate_size``); MoE flavors keep the published value unused."""
    moe: MoEArgs | None = None
    """Mixture of experts in every block instead of the dense feed-forward; None = dense."""
    norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    max_seq_len: int = 40960
    """Longest sequence the RoPE cache covers."""
    tie_word_embeddings: bool = False
    """Share the embedding matrix with the LM head (the 0.6B, 1.7B and 4B models)."""
    attention_mask: AttentionMask = "causal"
    """``block_causal`` (document-masked, variable-length attention) needs an attention
    front-end that the core does not offer yet; it is refused."""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads

    @property
    def ffn_dim(self) -> int:
        return self.ffn_hidden_dim

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"qwen3: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"qwen3: head_dim ({self.head_dim}) must be even for RoPE")
        if self.attention_mask != "causal":
            raise ConfigError(
                f"qwen3: attention_mask {self.attention_mask!r} (document-masked, variable-length attention) is "
                "not supported: the core's attention (plait.nn.attention) is causal SDPA over whole sequences; "
                "use attention_mask='causal'"
            )


def count_parameters(args: ModelArgs, *, include_embedding: bool = True, active_only: bool = False) -> int:
    """Parameters counted from the args (the LM head is not an embedding). ``active_only``
    counts the experts one token uses: ``top_k`` routed ones plus the shared ones."""
    attention = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.kv_heads) + 2 * args.head_dim
    if args.moe is None:
        feed_forward = 3 * args.dim * args.ffn_dim
    else:
        experts = args.moe.top_k if active_only else args.moe.num_experts
        shared = 3 * args.dim * args.moe.hidden_dim * args.moe.num_shared_experts
        feed_forward = 3 * args.dim * args.moe.hidden_dim * experts + shared + args.dim * args.moe.num_experts
    block = attention + feed_forward + 2 * args.dim
    total = args.n_layers * block + args.dim + args.vocab_size * args.dim
    if include_embedding and not args.tie_word_embeddings:
        total += args.vocab_size * args.dim
    return total


class TransformerBlock(PreNormBlock):
    """Pre-norm block; its second half is ``feed_forward`` (dense) or ``moe``."""

    def __init__(self, layer_id: int, args: ModelArgs) -> None:
        super().__init__(
            layer_id=layer_id,
            dim=args.dim,
            norm_eps=args.norm_eps,
            attention=Attention(dim=args.dim, n_heads=args.n_heads, n_kv_heads=args.kv_heads, head_dim=args.head_dim,
                                qk_norm_eps=args.norm_eps),
            feed_forward=FeedForward(dim=args.dim, hidden_dim=args.ffn_dim) if args.moe is None else None,
            moe=MoE(dim=args.dim, args=args.moe) if args.moe is not None else None,
        )


class Transformer(DecoderStack):
    """The Qwen3 decoder (``plait.nn.DecoderStack``), dense or MoE."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(
            vocab_size=args.vocab_size, dim=args.dim, norm_eps=args.norm_eps,
            blocks=[TransformerBlock(i, args) for i in range(args.n_layers)],
            rope_shape=(args.max_seq_len, 2 * args.head_dim), tie_word_embeddings=args.tie_word_embeddings,
        )  # fmt: skip
        self.args = args

    def rope_table(self, device: torch.device) -> torch.Tensor:
        return rope_cache(self.args.head_dim, self.args.max_seq_len, theta=self.args.rope_theta, device=device)
