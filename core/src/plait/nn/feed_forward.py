"""SwiGLU feed-forward: ``w2(silu(w1(x)) * w3(x))``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plait.nn.init import trunc_normal_


def swiglu_hidden_dim(dim: int, *, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """The usual SwiGLU width: 2/3 of ``4 * dim``, optionally scaled, rounded up to ``multiple_of``."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class FeedForward(nn.Module):
    def __init__(self, *, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, *, std: float, out_std: float) -> None:
        """Truncated normal; ``out_std`` for the projections feeding the residual path."""
        trunc_normal_(self.w1.weight, std=std)
        for linear in (self.w2, self.w3):
            trunc_normal_(linear.weight, std=out_std)
