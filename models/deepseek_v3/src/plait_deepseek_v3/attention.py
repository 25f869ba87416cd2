"""Multi-head latent attention (MLA), DeepSeek-V2/V3's attention.

Queries come from ``wq`` (or, with ``q_lora_rank > 0``, through a low-rank bottleneck:
``wq_a`` -> RMSNorm -> ``wq_b``). Keys and values share one compressed latent:
``wkv_a`` maps the input to ``kv_lora_rank`` latent features plus ``qk_rope_head_dim``
features of a single rotary key shared by all heads; the latent is normalized and
``wkv_b`` expands it to every head's non-rotary key (``qk_nope_head_dim``) and value
(``v_head_dim``). Each head's query and key are ``[no-rope part, rope part]``; RoPE
(with YaRN) rotates the rope parts only.

Heads are recovered with ``view(batch, seq, -1, ...)``, so a tensor-parallel plan that
shards ``wq``/``wq_b``/``wkv_b`` column-wise and ``wo`` row-wise changes nothing here;
the latent projections and their norms stay replicated, and the rotary key, which every
head uses, passes through ``rope_key`` (``HeadShared``) so that tp sums its gradient.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from plait.nn import HeadShared, RMSNorm, ScaledDotProductAttention, apply_rope, trunc_normal_
from plait_deepseek_v3.args import ModelArgs

if TYPE_CHECKING:
    from plait.generation import LayerCache

#: The norms of the low-rank latents use DeepSeek's default epsilon, whatever ``norm_eps`` is.
LATENT_NORM_EPS = 1e-6


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.qk_nope_head_dim = args.qk_nope_head_dim
        self.qk_rope_head_dim = args.qk_rope_head_dim
        self.qk_head_dim = args.qk_head_dim
        self.v_head_dim = args.v_head_dim
        self.kv_lora_rank = args.kv_lora_rank
        query_width = args.n_heads * args.qk_head_dim
        if args.q_lora_rank == 0:
            self.wq: nn.Linear | None = nn.Linear(args.dim, query_width, bias=False)
            self.wq_a = self.q_norm = self.wq_b = None
        else:
            self.wq = None
            self.wq_a: nn.Linear | None = nn.Linear(args.dim, args.q_lora_rank, bias=False)
            self.q_norm: RMSNorm | None = RMSNorm(args.q_lora_rank, eps=LATENT_NORM_EPS)
            self.wq_b: nn.Linear | None = nn.Linear(args.q_lora_rank, query_width, bias=False)
        self.wkv_a = nn.Linear(args.dim, args.kv_lora_rank + args.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(args.kv_lora_rank, eps=LATENT_NORM_EPS)
        self.wkv_b = nn.Linear(args.kv_lora_rank, args.n_heads * (args.qk_nope_head_dim + args.v_head_dim), bias=False)
        self.wo = nn.Linear(args.n_heads * args.v_head_dim, args.dim, bias=False)
        self.rope_key = HeadShared()  # tensor parallelism sums its gradient over the ranks' heads
        self.sdpa = ScaledDotProductAttention(scale=args.softmax_scale)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        if self.wq is not None:
            return self.wq(x)
        return self.wq_b(self.q_norm(self.wq_a(x)))

    def forward(self, x: torch.Tensor, *, rope_cache: torch.Tensor, cache: LayerCache | None = None
                ) -> torch.Tensor:  # fmt: skip
        """``x``: ``[batch, seq, dim]``; ``rope_cache``: ``[positions, 2 * qk_rope_head_dim]``
        (keyword-only, so that a tensor-parallel input hook sees ``x`` as the only input).
        ``cache`` (generation, ``plait.generation``) stores the compressed, normalized latent
        ``[batch, seq, kv_lora_rank]`` and the rotated key ``[batch, seq, qk_rope_head_dim]``,
        not the per-head keys and values they expand to."""
        batch, seq_len, _ = x.shape
        positions = None if cache is None else cache.positions
        q = self._queries(x).view(batch, seq_len, -1, self.qk_head_dim)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q = torch.cat((q_nope, apply_rope(q_rope, rope_cache, positions)), dim=-1)

        latent, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_rope = self.rope_key(apply_rope(k_rope.unsqueeze(2), rope_cache, positions))  # one rotary key for all heads
        latent = self.kv_norm(latent)
        if cache is not None:
            latent, k_rope = cache.update(latent=latent, k_rope=k_rope.squeeze(2))
            k_rope = k_rope.unsqueeze(2)
        kv = self.wkv_b(latent).view(batch, latent.shape[1], -1, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_rope.expand(-1, -1, k_nope.shape[2], -1)), dim=-1)

        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = self.sdpa(q, k, v) if cache is None else self.sdpa(q, k, v, mask=cache.mask)
        return self.wo(out.transpose(1, 2).reshape(batch, seq_len, -1))

    def init_weights(self, *, std: float, out_std: float) -> None:
        """Truncated normal projections; ``out_std`` for ``wo`` (depth-scaled by the caller)."""
        for linear in (self.wq, self.wq_a, self.wq_b, self.wkv_a, self.wkv_b):
            if linear is not None:
                trunc_normal_(linear.weight, std=std)
        trunc_normal_(self.wo.weight, std=out_std)
        for norm in (self.q_norm, self.kv_norm):
            if norm is not None:
                norm.reset_parameters()
