"""The Llama 3 decoder: token embedding, ``n_layers`` pre-norm blocks, final norm, LM head."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from plait.errors import ConfigError
from plait.nn import (
    Attention,
    DecoderStack,
    FeedForward,
    PreNormBlock,
    RopeScaling,
    rope_cache,
    swiglu_hidden_dim,
)


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelArgs:
    """Llama 3 hyperparameters. Frozen: derive variants with ``dataclasses.replace``."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means n_heads."""
    vocab_size: int = 128256
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    ffn_hidden_dim: int | None = None
    """Explicit FFN width (used for HF import); None derives it from the three fields above."""
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_rope_scaling: bool = False
    """Llama 3.1 frequency scaling of RoPE (long context)."""
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    max_seq_len: int = 2048
    """Longest sequence the RoPE cache covers."""
    tie_word_embeddings: bool = False
    """Share the embedding matrix with the LM head (Llama 3.2 1B/3B)."""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """The resolved FFN width."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        return swiglu_hidden_dim(self.dim, multiple_of=self.multiple_of, ffn_dim_multiplier=self.ffn_dim_multiplier)

    @property
    def rope_scaling(self) -> RopeScaling | None:
        if not self.use_rope_scaling:
            return None
        return RopeScaling(
            factor=self.rope_scaling_factor,
            low_freq_factor=self.rope_low_freq_factor,
            high_freq_factor=self.rope_high_freq_factor,
            original_max_position_embeddings=self.rope_original_max_position_embeddings,
        )

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ConfigError(f"llama3: dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.kv_heads:
            raise ConfigError(f"llama3: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"llama3: head_dim = dim / n_heads ({self.head_dim}) must be even for RoPE")


def count_parameters(args: ModelArgs, *, include_embedding: bool = True, active_only: bool = False) -> int:
    """Parameters of the model, counted from its args (the LM head is not an embedding);
    every weight is active (``active_only`` is for the signature ``plait.decoder_spec`` reads)."""
    attention = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.kv_heads)
    feed_forward = 3 * args.dim * args.ffn_dim
    block = attention + feed_forward + 2 * args.dim
    lm_head = args.vocab_size * args.dim
    total = args.n_layers * block + args.dim + lm_head
    if include_embedding and not args.tie_word_embeddings:
        total += args.vocab_size * args.dim
    return total


class TransformerBlock(PreNormBlock):
    def __init__(self, layer_id: int, args: ModelArgs) -> None:
        super().__init__(
            layer_id=layer_id,
            dim=args.dim,
            norm_eps=args.norm_eps,
            attention=Attention(dim=args.dim, n_heads=args.n_heads, n_kv_heads=args.kv_heads),
            feed_forward=FeedForward(dim=args.dim, hidden_dim=args.ffn_dim),
        )
        self.layer_id = layer_id


class Transformer(DecoderStack):
    """The Llama 3 decoder (``plait.nn.DecoderStack``)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(
            vocab_size=args.vocab_size, dim=args.dim, norm_eps=args.norm_eps,
            blocks=[TransformerBlock(i, args) for i in range(args.n_layers)],
            rope_shape=(args.max_seq_len, 2 * args.head_dim), tie_word_embeddings=args.tie_word_embeddings,
        )  # fmt: skip
        self.args = args

    def rope_table(self, device: torch.device) -> torch.Tensor:
        args = self.args
        return rope_cache(args.head_dim, args.max_seq_len, theta=args.rope_theta, scaling=args.rope_scaling,
                          device=device)  # fmt: skip
