"""A batch of rollouts and how the trainer cuts it into micro-batches."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from plait.data.batch import TensorBatch


@dataclass
class Rollout:
    """One optimizer step's completions: ``N`` rows, groups of ``group_size`` consecutive
    rows sharing a prompt. Prompts are left-padded to P columns, completions L columns."""

    index: int
    """Which step's batch (0 = the first step of the run)."""
    version: int
    """The policy version that sampled it (the number of optimizer steps of its weights)."""
    tokens: torch.Tensor
    """[N, P + L] prompt and completion ids."""
    prompt_mask: torch.Tensor
    """[N, P] 1 on prompt tokens, 0 on left padding."""
    completion_mask: torch.Tensor
    """[N, L] 1 on completion tokens (up to and including the end-of-text token)."""
    logprobs: torch.Tensor
    """[N, L] log-probabilities of the sampling policy (``completion_logprobs``)."""
    ref_logprobs: torch.Tensor | None
    """[N, L] the reference policy's, with a KL penalty; else None."""
    rewards: torch.Tensor
    """[N] float32."""
    generation_seconds: float
    completions: list[str]

    @property
    def new_tokens(self) -> int:
        return int(self.completion_mask.sum())


def micro_batch_rows(*, micro_batch: int, dp_rank: int, dp_degree: int, rows: int) -> slice:
    """Rows of micro-batch ``micro_batch`` on data-parallel rank ``dp_rank``: the batch is
    cut into chunks of ``rows`` in order, round-robin over the ranks, so the generator
    computes the sampling policy's log-probabilities on exactly the trainer's chunks."""
    start = (micro_batch * dp_degree + dp_rank) * rows
    return slice(start, start + rows)


def training_micro_batches(rollout: Rollout, *, advantages: torch.Tensor, weights: torch.Tensor, rows: int,
                           dp_rank: int, dp_degree: int, accumulation: int,
                           device: torch.device) -> list[tuple[TensorBatch, torch.Tensor]]:  # fmt: skip
    """This rank's ``accumulation`` micro-batches: ``(TensorBatch, completion tokens)``."""
    prompt_len = rollout.prompt_mask.shape[1]
    fields = {"tokens": rollout.tokens, "prompt_mask": rollout.prompt_mask, "completion_mask": rollout.completion_mask,
              "old_logprobs": rollout.logprobs,
              "advantages": advantages, "weights": weights}  # fmt: skip
    if rollout.ref_logprobs is not None:
        fields["ref_logprobs"] = rollout.ref_logprobs
    batches = []
    for micro_batch in range(accumulation):
        part = micro_batch_rows(micro_batch=micro_batch, dp_rank=dp_rank, dp_degree=dp_degree, rows=rows)
        batch = TensorBatch({name: tensor[part] for name, tensor in fields.items()}).to(device)
        batches.append((batch, batch["tokens"][:, prompt_len:]))
    return batches
