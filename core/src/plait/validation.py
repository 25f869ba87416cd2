"""Validation: the mean loss (and perplexity) of held-out data at chosen steps.

Every pass reads the same batches from the start of the held-out data: ``--validation.
dataset`` or the ``--data.held_out_share`` that training never reads (a model with its own
data pipeline builds it with ``held_out=True``, and reports no perplexity). Each batch runs
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from plait.config import DataSection, JobConfig
from plait.data.batch import DataRequest
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
    token_loss: bool = True
    """A cross-entropy over tokens, whose exponential is a perplexity."""

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    def metrics(self) -> dict[str, float]:
        perplexity = {"validation/perplexity": self.perplexity} if self.token_loss else {}
        return {"validation/loss": self.loss, **perplexity, "validation/seconds": self.seconds}

    def console(self) -> str:
        perplexity = f"  perplexity {self.perplexity:,.2f}" if self.token_loss else ""
        return f"step {self.step}  validation loss {self.loss:.4f}{perplexity}  ({self.seconds:.2f} s)"


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

    def __init__(self, config: JobConfig, tokenizer: Tokenizer | None, *, dp_rank: int, dp_world_size: int,
                 device: torch.device, pipeline: Callable[[DataRequest], Iterator[Any]] | None = None,
                 model_args: Any = None) -> None:
        """Reads held-out tokens with ``tokenizer``, or, given a model's ``pipeline``
        (``ModelSpec.data_pipeline``), the batches it builds for ``held_out=True``."""
        section = config.validation
        self.interval = section.interval
        self.steps = section.steps
        self.device = device
        self.token_loss = pipeline is None
        local_batch_size = section.local_batch_size or config.training.local_batch_size
        if pipeline is not None:
            request = DataRequest(config=config, model_args=model_args, local_batch_size=local_batch_size,
                                  dp_rank=dp_rank, dp_world_size=dp_world_size, held_out=True)
            self._loader: Callable[[], Iterator[Any]] = lambda: pipeline(request)
        else:
            assert tokenizer is not None
            data, held_out = validation_data(config)
            source: DocumentSource = build_source(data, held_out=held_out)
            self._loader = lambda: TokenLoader(source, tokenizer, seq_len=config.training.seq_len,
                                               local_batch_size=local_batch_size, dp_rank=dp_rank,
                                               dp_world_size=dp_world_size)
        next(self._loader())  # an empty or unreadable held-out set fails now, not at the first pass

    def due(self, step: int, last_step: int) -> bool:
        return self.interval > 0 and (step % self.interval == 0 or step == last_step)

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
                                seconds=time.perf_counter() - started, token_loss=self.token_loss)
