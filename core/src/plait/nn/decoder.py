"""The pre-norm decoder the first-party models share: its blocks and the stack around them.

A model package subclasses both: its block builds the attention (and a dense
feed-forward or a MoE layer); its stack passes the sizes and blocks to
``DecoderStack.__init__`` and says how its RoPE table is computed (``rope_table``).
Construction, forward and initialization are the same for all of them.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from plait.nn.feed_forward import FeedForward
from plait.nn.init import trunc_normal_
from plait.nn.moe import MoE
from plait.nn.norms import RMSNorm

if TYPE_CHECKING:
    from plait.generation import KVCache, LayerCache


class PreNormBlock(nn.Module):
    """``h = x + attention(norm(x))``, then ``h + mlp(norm(h))``, where ``mlp`` is the
    block's ``moe`` if it has one, else its ``feed_forward``. ``attention`` takes the RoPE
    table as the keyword ``rope_cache`` and has ``init_weights(std=, out_std=)``.

    Residual-path projections (attention output, feed-forward down projection) start at
    ``0.02 / sqrt(2 * (layer_id + 1))``, so deep stacks start stable.
    """

    def __init__(
        self,
        *,
        layer_id: int,
        dim: int,
        norm_eps: float,
        attention: nn.Module,
        feed_forward: FeedForward | None = None,
        moe: MoE | None = None,
    ) -> None:
        super().__init__()
        if (feed_forward is None) == (moe is None):
            raise ValueError("a block has either a dense feed_forward or a moe layer")
        self.attention_norm = RMSNorm(dim, eps=norm_eps)
        self.attention = attention
        self.ffn_norm = RMSNorm(dim, eps=norm_eps)
        self.feed_forward = feed_forward
        self.moe = moe
        self.out_std = 0.02 / math.sqrt(2 * (layer_id + 1))

    @property
    def mlp(self) -> nn.Module:
        return self.moe if self.moe is not None else self.feed_forward

    def forward(self, x: torch.Tensor, rope_cache: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        if cache is None:
            h = x + self.attention(self.attention_norm(x), rope_cache=rope_cache)
        else:  # generation: the attention reads and extends its cache
            h = x + self.attention(self.attention_norm(x), rope_cache=rope_cache, cache=cache)
        return h + self.mlp(self.ffn_norm(h))

    def init_weights(self) -> None:
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(std=0.02, out_std=self.out_std)
        self.mlp.init_weights(std=0.02, out_std=self.out_std)


class DecoderStack(nn.Module):
    """``forward(tokens[B, S]) -> logits[B, S, vocab]`` through ``tok_embeddings``, the
    ``layers`` (a ModuleDict of ``blocks`` keyed "0".."n-1", each given the ``rope_cache``
    buffer), ``norm`` (RMSNorm) and ``output`` (the LM head, sharing the embedding's weight
    when ``tie_word_embeddings``). ``rope_cache`` has ``rope_shape`` (positions first) and
    is filled by ``init_weights`` from ``rope_table``, which a subclass implements.

    A pipeline stage may delete entries of ``layers`` and set ``tok_embeddings``,
    ``norm`` or ``output`` to None; ``forward`` then takes and returns hidden states
    where those modules are missing.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        dim: int,
        norm_eps: float,
        blocks: Iterable[nn.Module],
        rope_shape: tuple[int, int],
        tie_word_embeddings: bool = False,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleDict({str(i): block for i, block in enumerate(blocks)})
        self.norm: nn.Module | None = RMSNorm(dim, eps=norm_eps)
        self.output: nn.Linear | None = nn.Linear(dim, vocab_size, bias=False)
        self.register_buffer("rope_cache", torch.empty(rope_shape, dtype=torch.float32), persistent=False)
        self.tie_word_embeddings = tie_word_embeddings
        self.tie_weights()

    def rope_table(self, device: torch.device) -> torch.Tensor:
        """The values of ``rope_cache`` (float32, ``rope_shape``), computed on ``device``."""
        raise NotImplementedError(f"{type(self).__name__} must implement rope_table(device)")

    def init_weights(self) -> None:
        """Initialize every parameter and buffer from the global torch RNG (call under
        no_grad): the RoPE table, the embedding (N(0, 1); a tied one takes the LM head's
        scale ``dim ** -0.5``), each block, the final norm, the LM head (truncated normal
        of std ``dim ** -0.5``)."""
        self.rope_cache.copy_(self.rope_table(self.rope_cache.device))
        head_std = self.dim**-0.5
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=head_std if self.tie_word_embeddings else 1.0)
        for layer in self.layers.values():
            layer.init_weights()
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None and self.output.weight is not getattr(self.tok_embeddings, "weight", None):
            trunc_normal_(self.output.weight, std=head_std)

    def tie_weights(self) -> None:
        if self.tie_word_embeddings and self.tok_embeddings is not None and self.output is not None:
            if self.output.weight is not self.tok_embeddings.weight:
                self.output.weight = self.tok_embeddings.weight

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - torch's signature
        # Moving or materializing (``to_empty``) replaces parameters one module at a time,
        # which would silently untie a shared embedding / LM head; tie them again.
        super()._apply(fn, recurse)
        self.tie_weights()
        return self

    def forward(self, tokens: torch.Tensor, *, cache: KVCache | None = None) -> torch.Tensor:
        """``cache``: generation (``plait.generation``): ``tokens`` are the next columns of the
        cached sequence."""
        if cache is not None:
            return self._forward_cached(tokens, cache)
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for layer in self.layers.values():
            h = layer(h, self.rope_cache)
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h

    def _forward_cached(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if self.tok_embeddings is None or self.norm is None or self.output is None:
            raise ValueError("generation needs the whole model, not a pipeline stage")
        cache.append(tokens.shape[1])
        if cache.length > self.rope_cache.shape[0]:
            raise ValueError(f"{cache.length} tokens exceed the RoPE table ({self.rope_cache.shape[0]} positions); "
                             "raise the model's max_seq_len")  # fmt: skip
        h = self.tok_embeddings(tokens)
        for key, layer in self.layers.items():
            h = layer(h, self.rope_cache, cache=cache.layer(key))
        return self.output(self.norm(h))
