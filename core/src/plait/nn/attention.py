"""Causal self-attention with grouped-query heads on top of SDPA.

Heads are always recovered with ``view(batch, seq, -1, head_dim)``, never from a stored
head count, so a tensor-parallel plan that shards ``wq``/``wk``/``wv`` column-wise and
``wo`` row-wise gives each rank its share of the heads without any change here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from plait.nn.init import trunc_normal_
from plait.nn.norms import RMSNorm
from plait.nn.rope import apply_rope

if TYPE_CHECKING:
    from plait.generation import LayerCache


class ScaledDotProductAttention(nn.Module):
    """Causal SDPA as a module of its own, so context parallelism can wrap exactly it.

    Takes ``q, k, v`` as ``[batch, heads, seq, head_dim]`` with equal head counts; values
    may be narrower than queries and keys. ``scale`` is the softmax scale, passed to SDPA
    explicitly when a model's differs from ``q.shape[-1] ** -0.5`` (or to state it).
    """

    def __init__(self, *, scale: float | None = None) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None
                ) -> torch.Tensor:  # fmt: skip
        """``mask`` (generation: bool, True = attend, broadcast to ``[batch, heads, q_len, k_len]``)
        replaces the causal mask."""
        if q.dtype == torch.bfloat16 and q.device.type == "cpu" and _fp32_is_faster_on_cpu(k.shape[-2], q.shape[-1]):
            with torch.autocast("cpu", enabled=False):
                out = self._attend(q.float(), k.float(), v.float(), mask)
            return out.to(torch.bfloat16)
        return self._attend(q, k, v, mask)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)

    def extra_repr(self) -> str:
        return "" if self.scale is None else f"scale={self.scale:.6g}"


def _fp32_is_faster_on_cpu(seq_len: int, head_dim: int) -> bool:
    """Whether torch's CPU attention kernel runs this shape faster on fp32 inputs than on
    bf16 ones (then bf16 attention runs in fp32, rounded once: faster and more exact).
    Measured forward + backward, one thread, torch 2.13: fp32 is 1.6x faster at sequence
    256 x head_dim 16, 1.2x at 256 x 32, 1.05x at 256 x 64, 1.2x at 512 x 16, even at
    512 x 32; bf16 is faster from 384 x 64, 256 x 128 and 1024 x 16 on (1.1-1.3x)."""
    return seq_len < 1024 and seq_len * head_dim <= 16384


class Attention(nn.Module):
    """Multi-head causal attention; ``n_kv_heads < n_heads`` gives grouped-query attention.

    ``head_dim`` may differ from ``dim / n_heads`` (Qwen3). ``qk_norm_eps`` adds an RMSNorm
    over each query and key head before RoPE (``q_norm``, ``k_norm``; Qwen3, OLMo 2).
    """

    def __init__(self, *, dim: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None,
                 qk_norm_eps: float | None = None) -> None:  # fmt: skip
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.head_dim = head_dim or dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        with_norms = qk_norm_eps is not None
        self.q_norm = RMSNorm(self.head_dim, eps=qk_norm_eps) if with_norms else None
        self.k_norm = RMSNorm(self.head_dim, eps=qk_norm_eps) if with_norms else None
        # an explicit head_dim states the softmax scale (SDPA's default, 1 / sqrt(head_dim))
        self.sdpa = ScaledDotProductAttention(scale=self.head_dim**-0.5 if head_dim is not None else None)

    def forward(self, x: torch.Tensor, *, rope_cache: torch.Tensor, cache: LayerCache | None = None
                ) -> torch.Tensor:  # fmt: skip
        """``x``: ``[batch, seq, dim]``; ``rope_cache``: see ``plait.nn.rope.rope_cache``;
        ``cache``: generation's view of this layer (``plait.generation``), which stores the
        keys and values ``[batch, kv_heads, seq, head_dim]``.

        ``rope_cache`` is keyword-only so that a tensor-parallel input hook sees ``x`` as
        the module's only positional input.
        """
        batch, seq_len, _ = x.shape
        q = self.wq(x).view(batch, seq_len, -1, self.head_dim)
        k = self.wk(x).view(batch, seq_len, -1, self.head_dim)
        v = self.wv(x).view(batch, seq_len, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cache is not None:
            q, k = apply_rope(q, rope_cache, cache.positions), apply_rope(k, rope_cache, cache.positions)
            k, v = (t.transpose(1, 2) for t in cache.update(k=k.transpose(1, 2), v=v.transpose(1, 2)))
        else:
            q, k = apply_rope(q, rope_cache), apply_rope(k, rope_cache)

        queries_per_kv = q.shape[2] // k.shape[2]
        if queries_per_kv > 1:
            k = k.repeat_interleave(queries_per_kv, dim=2)
            v = v.repeat_interleave(queries_per_kv, dim=2)

        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = self.sdpa(q, k, v) if cache is None else self.sdpa(q, k, v, mask=cache.mask)
        return self.wo(out.transpose(1, 2).reshape(batch, seq_len, -1))

    def init_weights(self, *, std: float, out_std: float) -> None:
        """Truncated normal projections; ``out_std`` for ``wo`` (depth-scaled by the caller)."""
        for linear in (self.wq, self.wk, self.wv):
            trunc_normal_(linear.weight, std=std)
        trunc_normal_(self.wo.weight, std=out_std)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()
