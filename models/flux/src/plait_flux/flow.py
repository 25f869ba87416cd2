"""Rectified flow: the training objective and the sampler.

A sample at time ``t`` in [0, 1] is ``x_t = (1 - t) * x0 + t * noise``; the model predicts
the velocity ``dx_t/dt = noise - x0``, trained with the mean squared error. Sampling
integrates the predicted velocity from ``t = 1`` (noise) to ``t = 0`` (data) with Euler
steps on the reference's resolution-shifted schedule, with classifier-free guidance.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


def sample_timesteps(n: int, *, generator: torch.Generator, sampling: str = "uniform", logit_mean: float = 0.0,
                     logit_std: float = 1.0, shift: float = 1.0) -> torch.Tensor:
    """``n`` training timesteps: uniform in [0, 1], or ``sigmoid(N(logit_mean, logit_std))``
    (logit-normal); then shifted towards noise by ``shift`` (1: unchanged)."""
    if sampling == "uniform":
        t = torch.rand(n, generator=generator)
    elif sampling == "logit_normal":
        t = torch.sigmoid(torch.randn(n, generator=generator) * logit_std + logit_mean)
    else:
        raise ValueError(f"unknown timestep sampling {sampling!r}; choose one of {', '.join(TIMESTEP_SAMPLINGS)}")
    return shift_timesteps(t, shift)


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """``shift * t / (1 + (shift - 1) * t)``: more time near noise for ``shift > 1``."""
    return shift * t / (1 + (shift - 1) * t)


def noised(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, velocity target)`` for data ``x0`` [B, ...], ``noise`` like it and times ``t`` [B]."""
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise, noise - x0


def flow_matching_loss(predicted_velocity: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(predicted_velocity.float(), target.float())


# ----------------------------------------------------------------------------- sampling


def time_shift(mu: float, sigma: float, t: torch.Tensor) -> torch.Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def resolution_mu(image_seq_len: int, *, base_shift: float = 0.5, max_shift: float = 1.15,
                  base_len: int = 256, max_len: int = 4096) -> float:
    """The schedule's shift, linear in the number of image tokens."""
    slope = (max_shift - base_shift) / (max_len - base_len)
    return slope * image_seq_len + base_shift - slope * base_len


def sampling_schedule(num_steps: int, image_seq_len: int, *, base_shift: float = 0.5, max_shift: float = 1.15,
                      shift: bool = True) -> list[float]:
    """``num_steps + 1`` times from 1 to 0; shifted towards noise for longer images."""
    timesteps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    if shift:
        mu = resolution_mu(image_seq_len, base_shift=base_shift, max_shift=max_shift)
        timesteps = time_shift(mu, 1.0, timesteps)
    return timesteps.tolist()


def guided(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``unconditional + scale * (conditional - unconditional)``."""
    return unconditional + scale * (conditional - unconditional)


def euler_sample(velocity: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor,
                 timesteps: list[float]) -> torch.Tensor:
    """Integrate ``dx/dt = velocity(x, t)`` along ``timesteps`` (decreasing) with Euler steps."""
    for t_current, t_next in zip(timesteps[:-1], timesteps[1:]):
        x = x + (t_next - t_current) * velocity(x, t_current)
    return x


# ----------------------------------------------------------------------------- packing


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/2)(W/2), 4C]``: 2×2 patches as tokens, row-major."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack_latents`` for latents of ``height`` × ``width``."""
    b, _, features = tokens.shape
    c = features // 4
    return tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def image_ids(height: int, width: int) -> torch.Tensor:
    """Position ids ``[(H/2)(W/2), 3]`` of packed latents: (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.flatten(0, 1)


def text_ids(length: int) -> torch.Tensor:
    return torch.zeros(length, 3)
