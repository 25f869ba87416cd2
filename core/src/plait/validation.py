"""Validation: the mean loss (and perplexity) of held-out data at chosen steps.

Every pass reads the same batches from the start of the held-out data: ``--validation.
dataset`` or the ``--data.held_out_share`` that training never reads. Each batch runs
forward only (``plait_evaluate``: the pipeline plugin runs its schedule's forward pass),
in eval mode, inside the plugins' step contexts (context-parallel sharding, loss
parallelism, autocast), so every layout computes the loss one process would. Nothing of
the training state changes: not the RNG, not the training data's position, not the MoE
routing statistics (they count in training mode only).
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from plait.config import DataSection, JobConfig
from plait.data.loader import TokenLoader
from plait.data.sources import DocumentSource, build_source
from plait.data.tokenizer import Tokenizer
from plait.step import evaluate_micro_batch
from plait.train_state import StepContext


@dataclass(kw_only=True, frozen=True)
class ValidationResult:
    step: int
    loss: float
    seconds: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    def metrics(self) -> dict[str, float]:
        return {"validation/loss": self.loss, "validation/perplexity": self.perplexity,
                "validation/seconds": self.seconds}


def validation_data(config: JobConfig) -> tuple[DataSection, bool]:
    """The data section validation reads, and whether it is the held-out side of the
    training data's split."""
    section = config.validation
    if section.dataset:
        data = dataclasses.replace(config.data, dataset=section.dataset, dataset_config=section.dataset_config,
                                   split=section.split, held_out_share=0.0)
        return data, False
    return config.data, True


class Validator:
    """Runs validation passes of a run; built (and its data checked) before training starts."""

    def __init__(self, config: JobConfig, tokenizer: Tokenizer, *, dp_rank: int, dp_world_size: int,
                 device: torch.device) -> None:
        section = config.validation
        self.interval = section.interval
        self.steps = section.steps
        self.device = device
        data, held_out = validation_data(config)
        self._source: DocumentSource = build_source(data, held_out=held_out)
        self._loader_options = dict(
            seq_len=config.training.seq_len,
            local_batch_size=section.local_batch_size or config.training.local_batch_size,
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
        )
        self._tokenizer = tokenizer
        next(self._loader())  # an empty or unreadable held-out set fails now, not at the first pass

    def due(self, step: int, last_step: int) -> bool:
        return self.interval > 0 and (step % self.interval == 0 or step == last_step)

    def _loader(self) -> TokenLoader:
        return TokenLoader(self._source, self._tokenizer, **self._loader_options)

    def run(self, step: int, make_context: Callable[[], StepContext], mean: Callable[[torch.Tensor], float]
            ) -> ValidationResult:
        """One pass at training step ``step``; ``make_context`` gives a step context for the
        model, ``mean`` averages a loss over the data-parallel ranks."""
        started = time.perf_counter()
        ctx = make_context()
        parts = ctx.model_parts
        modes = [part.training for part in parts]
        for part in parts:
            part.eval()
        try:
            total = torch.zeros((), dtype=torch.float64)
            loader = self._loader()
            for _ in range(self.steps):
                inputs, labels = next(loader)
                ctx.inputs, ctx.labels = inputs.to(self.device), labels.to(self.device)
                total += evaluate_micro_batch(ctx).double().cpu()
        finally:
            for part, mode in zip(parts, modes):
                part.train(mode)
        return ValidationResult(step=step, loss=mean((total / self.steps).float()),
                                seconds=time.perf_counter() - started)
