"""RoPE for the rotary part of DeepSeek-V3's heads, with YaRN context extension.

The table has the layout of ``plait.nn.rope.rope_cache`` (``cat(cos, sin)`` per position,
rotate-half convention), so ``plait.nn.apply_rope`` applies it.

YaRN (https://arxiv.org/abs/2309.00071) stretches the rotation by ``factor`` for the
frequencies whose wavelength exceeds the context seen in pretraining
(``original_seq_len``), keeps the fast ones, and blends the two over a band set by
``beta_fast`` and ``beta_slow`` (in rotations over ``original_seq_len``). DeepSeek then
sharpens the attention: the softmax scale is multiplied by ``softmax_mscale ** 2``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(kw_only=True, slots=True, frozen=True)
class Yarn:
    """YaRN parameters (DeepSeek's ``rope_factor``, ``original_seq_len``, ``beta_fast``,
    ``beta_slow``, ``mscale``)."""

    factor: float
    original_seq_len: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0

    @property
    def softmax_mscale(self) -> float:
        """``0.1 * mscale * ln(factor) + 1`` (1 when the factor does not stretch)."""
        if self.factor <= 1:
            return 1.0
        return 0.1 * self.mscale * math.log(self.factor) + 1.0


def _base_inv_freq(rope_dim: int, theta: float, device: torch.device | str | None) -> torch.Tensor:
    exponents = torch.arange(0, rope_dim, 2, dtype=torch.int64, device=device).float() / rope_dim
    return 1.0 / (theta**exponents)


def _dimension_of(rotations: float, *, rope_dim: int, theta: float, seq_len: int) -> float:
    """The (fractional) frequency index that turns ``rotations`` times over ``seq_len`` positions."""
    return rope_dim * math.log(seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def yarn_inv_freq(
    rope_dim: int, *, theta: float, yarn: Yarn, device: torch.device | str | None = None
) -> torch.Tensor:
    """Inverse frequencies ``[rope_dim // 2]`` in float32, stretched by YaRN."""
    inv_freq = _base_inv_freq(rope_dim, theta, device)
    fast = _dimension_of(yarn.beta_fast, rope_dim=rope_dim, theta=theta, seq_len=yarn.original_seq_len)
    slow = _dimension_of(yarn.beta_slow, rope_dim=rope_dim, theta=theta, seq_len=yarn.original_seq_len)
    low, high = max(math.floor(fast), 0), min(math.ceil(slow), rope_dim - 1)
    index = torch.arange(rope_dim // 2, dtype=torch.float32, device=device)
    stretch = ((index - low) / max(high - low, 1e-3)).clamp(0, 1)  # 0: keep, 1: divide by factor
    return inv_freq * (1 - stretch) + inv_freq / yarn.factor * stretch


def rope_table(
    rope_dim: int,
    max_seq_len: int,
    *,
    theta: float,
    yarn: Yarn | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``cat(cos, sin)`` for positions ``0..max_seq_len-1``: float32 ``[max_seq_len, 2 * rope_dim]``."""
    if rope_dim % 2:
        raise ValueError(f"RoPE needs an even dimension, got {rope_dim}")
    inv_freq = _base_inv_freq(rope_dim, theta, device) if yarn is None else yarn_inv_freq(
        rope_dim, theta=theta, yarn=yarn, device=device
    )
    positions = torch.arange(max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return torch.cat((angles.cos(), angles.sin()), dim=-1)
