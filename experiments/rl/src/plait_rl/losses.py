"""The policy-gradient objectives, as formulas over per-token tensors.

Notation (one step's global batch of N completions, G per prompt; completion i has
|o_i| tokens, mask m_it = 1 on them): reward R_i; ratio r_it = exp(logp_it - oldlogp_it),
where oldlogp are the log-probabilities of the policy that sampled the tokens.

- advantages: A_i = (R_i - mean_g R) / (std_g R + 1e-4) with ``std`` scaling (GRPO, DAPO;
  std unbiased over the group of G), A_i = R_i - mean_g R without (Dr.GRPO);
- per token: l_it = -min(r_it A_i, clip(r_it, 1 - eps_low, 1 + eps_high) A_i) + beta k3_it,
  with the KL estimator k3 = exp(ref - logp) - (ref - logp) - 1 to the reference policy;
- loss = sum_it w_it l_it, the weights normalizing by
  ``sequence`` (GRPO): w_it = m_it / (|o_i| N);  ``constant`` (Dr.GRPO): w_it = m_it / (L N),
  L = the most new tokens; ``token`` (DAPO): w_it = m_it / sum m over the batch.
  DAPO also drops groups whose rewards are all equal (their weights are 0, and they do not
  count in the denominator).

The weights are computed once per global batch, so the sum over micro-batches and
data-parallel ranks is exactly the loss of the whole batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ADVANTAGE_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, group_size: int, *, scaling: str) -> torch.Tensor:
    """``rewards`` [N] (groups of ``group_size`` consecutive rows) -> advantages [N]."""
    groups = rewards.float().view(-1, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if scaling == "std":
        centered = centered / (groups.std(dim=1, keepdim=True) + ADVANTAGE_EPS)
    elif scaling != "none":
        raise ValueError(f"unknown advantage scaling {scaling!r}")
    return centered.reshape(-1)


def token_weights(completion_mask: torch.Tensor, *, normalization: str, max_new_tokens: int,
                  keep: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``completion_mask`` [N, T] (1 on completion tokens) -> weights [N, T] whose sum over
    the batch of per-token losses is the batch's loss. ``keep`` [N] (bool): rows that count."""
    mask = completion_mask.float()
    if keep is not None:
        mask = mask * keep.float()[:, None]
    rows = mask.shape[0] if keep is None else int(keep.sum())
    if rows == 0 or mask.sum() == 0:
        return torch.zeros_like(mask)
    if normalization == "sequence":
        lengths = mask.sum(dim=1, keepdim=True).clamp(min=1)
        return mask / (lengths * rows)
    if normalization == "constant":
        return mask / (max_new_tokens * rows)
    if normalization == "token":
        return mask / mask.sum()
    raise ValueError(f"unknown normalization {normalization!r}")


def groups_with_spread(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] bool: rows of groups whose rewards are not all equal (DAPO's dynamic sampling filter)."""
    groups = rewards.view(-1, group_size)
    spread = (groups.max(dim=1).values - groups.min(dim=1).values) > 0
    return spread.repeat_interleave(group_size)


@dataclass
class PolicyLoss:
    loss: torch.Tensor
    """sum of w * per-token loss (a scalar with gradients)."""
    ratio: torch.Tensor
    """[N, T] exp(logp - oldlogp), detached."""
    clipped: torch.Tensor
    """[N, T] bool: tokens whose clipped term is the smaller one (no gradient through them)."""
    kl: torch.Tensor
    """[N, T] k3 estimate of KL(policy || reference) per token, detached (zeros without a reference)."""


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor,
                *, clip_low: float, clip_high: float, ref_logprobs: torch.Tensor | None = None,
                kl_coef: float = 0.0) -> PolicyLoss:  # fmt: skip
    """The clipped surrogate (plus ``kl_coef`` times k3 to ``ref_logprobs``), weighted by ``weights``."""
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped_ratio = ratio.clamp(1 - clip_low, 1 + clip_high)
    surrogate = torch.minimum(unclipped, clipped_ratio * adv)
    per_token = -surrogate
    kl = torch.zeros_like(logprobs)
    if ref_logprobs is not None and kl_coef:
        log_ref_over_policy = ref_logprobs - logprobs
        kl = torch.exp(log_ref_over_policy) - log_ref_over_policy - 1
        per_token = per_token + kl_coef * kl
    clipped = ((ratio > 1 + clip_high) & (adv > 0)) | ((ratio < 1 - clip_low) & (adv < 0))
    return PolicyLoss(loss=(weights * per_token).sum(), ratio=ratio.detach(), clipped=clipped, kl=kl.detach())
