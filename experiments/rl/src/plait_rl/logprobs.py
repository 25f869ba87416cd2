"""The policy's per-token log-probabilities: one function for the generator (the
log-probabilities of the policy that sampled) and the trainer (the current policy's,
with gradients), so that both compute them the same way on the same rows."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plait.generation import KVCache, supports_cache
from plait.step import mask_padded_logits


def policy_logits(model: nn.Module, tokens: torch.Tensor, prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``model``'s logits of ``tokens`` [B, T]; ``prompt_mask`` [B, P] (1 = token, 0 = left
    padding) marks the padding of the first P columns. A left-padded batch runs through the
    model's cache path (``plait.generation``): its padded columns are masked out of
    attention and take no positions, as in generation."""
    if prompt_mask is None or bool(prompt_mask.bool().all()):
        return model(tokens)
    if not supports_cache(model):
        raise ValueError(f"{type(model).__name__} takes no cache (plait.generation), so it cannot read left-padded "
                         "prompts: use prompts of one length")  # fmt: skip
    batch, length = tokens.shape
    cache = KVCache(batch_size=batch, max_len=length, device=tokens.device, attention_mask=prompt_mask)
    return model(tokens, cache=cache)


def completion_logprobs(model: nn.Module, tokens: torch.Tensor, *, prompt_mask: torch.Tensor, temperature: float,
                        vocab_size: int | None = None) -> torch.Tensor:  # fmt: skip
    """log pi(token | prefix) of the completion columns of ``tokens`` [B, P + L] (the first
    P columns are the prompt, ``prompt_mask`` [B, P]) -> [B, L], float32. The policy is
    softmax(logits / ``temperature``) over ids below ``vocab_size`` (the tokenizer's), the
    distribution ``plait.generate`` samples from."""
    prompt_len = prompt_mask.shape[1]
    logits = policy_logits(model, tokens[:, :-1], prompt_mask)[:, prompt_len - 1 :]
    logits = logits.float() / temperature
    if vocab_size is not None:
        logits = mask_padded_logits(logits, vocab_size)
    targets = tokens[:, prompt_len:]
    # cross_entropy rather than log_softmax + gather: it also reads vocabulary-sharded logits (tp's loss parallelism)
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    nll = nll.full_tensor() if hasattr(nll, "full_tensor") else nll
    return -nll.view(targets.shape)
