"""What a model that brings its own data pipeline trains on.

A language model's micro-batch is ``(tokens, labels)``. A model with its own pipeline
(``ModelSpec.data_pipeline``) yields ``(TensorBatch, labels)`` instead: named tensors,
every one with the batch on dim 0, that the core moves to the device and passes to the
model as keyword arguments (``model(**inputs)``); the spec's ``loss_fn(outputs, labels)``
turns the output into the loss. ``call_model`` is the one place that tells the two apart.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Protocol, Union

import torch

if TYPE_CHECKING:
    from plait.config import JobConfig


class TensorBatch(dict):
    """Named tensors of one batch (``str -> Tensor``), the batch on dim 0 of each."""

    @property
    def batch_size(self) -> int:
        return next(iter(self.values())).shape[0]

    @property
    def device(self) -> torch.device:
        return next(iter(self.values())).device

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> TensorBatch:
        return TensorBatch({name: t.to(device, non_blocking=non_blocking) for name, t in self.items()})

    def rows(self, start: int, stop: int) -> TensorBatch:
        return TensorBatch({name: t[start:stop] for name, t in self.items()})

    def split(self, parts: int) -> list[TensorBatch]:
        """``parts`` micro-batches of equal size, in order."""
        size = self.batch_size
        if parts < 1 or size % parts:
            raise ValueError(f"cannot split a batch of {size} into {parts} equal micro-batches")
        step = size // parts
        return [self.rows(start, start + step) for start in range(0, size, step)]

    @staticmethod
    def concat(batches: list[TensorBatch]) -> TensorBatch:
        return TensorBatch({name: torch.cat([b[name] for b in batches]) for name in batches[0]})


ModelInputs = Union[torch.Tensor, TensorBatch]


def call_model(model: Any, inputs: ModelInputs) -> Any:
    """``model(**inputs)`` for named inputs, ``model(tokens)`` for a language model."""
    return model(**inputs) if isinstance(inputs, TensorBatch) else model(inputs)


@dataclass(kw_only=True, frozen=True)
class DataRequest:
    """What a model's ``data_pipeline`` is built for: the run, its model args, this rank's
    share of every global batch, and which side of the data (training or held out)."""

    config: JobConfig
    model_args: Any
    local_batch_size: int
    dp_rank: int
    dp_world_size: int
    held_out: bool = False
    """True for validation: the held-out samples, read the same way on every pass (no
    random augmentation; a model's random inputs, such as diffusion timesteps, fixed)."""


class DataPipeline(Protocol):
    """What ``ModelSpec.data_pipeline`` returns: an endless iterator of ``(inputs,
    labels)`` micro-batches on the CPU, rows ``[dp_rank * B, (dp_rank + 1) * B)`` of each
    global batch (so a step trains on the same samples in every layout), whose position
    is its state (saved in every checkpoint and loaded on resume, exactly)."""

    def __iter__(self) -> Iterator[tuple[ModelInputs, torch.Tensor]]: ...

    def __next__(self) -> tuple[ModelInputs, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
