"""A marker for tensors that all attention heads share."""
from __future__ import annotations

import torch
from torch import nn


class HeadShared(nn.Module):
    """Identity. Wraps a tensor that every attention head uses, such as the single
    rotary key of multi-head latent attention.

    Under tensor parallelism each rank runs only its share of the heads, so the gradient
    it computes for such a tensor is a partial sum; the model's tp plan gives this
    module the ``sum_gradient`` style, which sums that gradient over the tp ranks.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
