"""Small records the core hands to plugins through hooks."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    import torch
    from torch import nn

    from plait.config import JobConfig
    from plait.parallel_dims import ParallelDims


@dataclass(kw_only=True, frozen=True)
class DeviceInfo:
    type: str
    """torch device type: "cpu", "cuda" (also ROCm builds of torch)."""
    backend: str
    """torch.distributed backend: "gloo", "nccl", ..."""
    peak_flops: float
    """Peak dense FLOP/s of one device at the training dtype, for MFU."""
    name: str = ""


@dataclass(kw_only=True)
class PipelineResult:
    """What the pipeline plugin returns: this rank's model chunks and its schedule."""

    model_parts: list[nn.Module]
    schedule: Any
    has_first_stage: bool
    has_last_stage: bool
    stage_ids: list[int] = field(default_factory=list)
    """The stage index of each model part."""
    num_stages: int = 1
    microbatches: int = 1
    """Pipeline microbatches per micro-batch of the core."""
    microbatches_in_flight: int = 0
    """The most microbatches whose activations a rank holds at once under the schedule
    (0: all of them); ``plait plan`` sizes the activation memory with it."""


@dataclass(kw_only=True)
class StepContext:
    """The state of the current optimizer step, passed to the per-step hooks."""

    step: int
    config: JobConfig
    parallel_dims: ParallelDims
    model_parts: list[nn.Module]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    #: current micro-batch (set before each forward/backward)
    inputs: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    #: the loss of each micro-batch is divided by this (gradient accumulation)
    grad_accumulation_steps: int = 1
    pipeline: PipelineResult | None = None
    #: yields (inputs, labels) micro-batches already on the device
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None
    #: the plugin manager's hook relay, for hooks called inside the step
    hook: Any = None
    #: filled by the step: summed loss, grad norm, ...; hooks may add scalars to log under
    #: "metrics" (console and TensorBoard) and "metric_details" (TensorBoard only)
    results: dict[str, Any] = field(default_factory=dict)
