"""Running one micro-batch through the pipeline schedule and reporting its loss."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from plait.dtensors import full_tensor


class MicrobatchLoss:
    """The loss function the schedule calls on the last stage for each pipeline microbatch.

    It divides the model's mean loss by the number of pipeline microbatches and by the
    core's gradient-accumulation steps, so that the summed microbatch losses are the
    micro-batch's mean loss over accumulation steps (what the core's own forward/backward
    returns), and the gradients those of one process on the whole batch. The model's loss
    function and the divisor are known only at step time; ``bind`` sets them.
    """

    def __init__(self) -> None:
        self._loss_fn: Callable[[Any, Any], torch.Tensor] | None = None
        self._divisor = 1

    def bind(self, loss_fn: Callable[[Any, Any], torch.Tensor], divisor: int) -> None:
        self._loss_fn = loss_fn
        self._divisor = divisor

    def __call__(self, output: Any, target: Any) -> torch.Tensor:
        if self._loss_fn is None:
            raise RuntimeError("MicrobatchLoss called before bind(): the pipeline step sets the loss function")
        return self._loss_fn(output, target) / self._divisor


@dataclass(kw_only=True)
class PipelineRunner:
    """This rank's side of the pipeline: its stages' schedule and where the loss is.

    It is the ``schedule`` of the ``PipelineResult`` the plugin hands the core.
    """

    schedule: Any
    """The torch schedule (``torch.distributed.pipelining``)."""
    stage_indices: list[int]
    num_stages: int
    microbatches: int
    loss: MicrobatchLoss
    group: dist.ProcessGroup
    """The pp process group."""
    loss_owner: int
    """Rank in ``group`` that holds the last stage."""

    @property
    def has_first_stage(self) -> bool:
        return 0 in self.stage_indices

    @property
    def has_last_stage(self) -> bool:
        return self.num_stages - 1 in self.stage_indices

    def forward_backward(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        *,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        grad_accumulation_steps: int,
    ) -> torch.Tensor:
        """Run the schedule on one micro-batch; every pp rank returns its detached loss."""
        self.loss.bind(loss_fn, divisor=self.microbatches * grad_accumulation_steps)
        args = (inputs,) if self.has_first_stage else ()
        microbatch_losses: list[torch.Tensor] = []
        if self.has_last_stage:
            self.schedule.step(*args, target=labels, losses=microbatch_losses, return_outputs=False)
        else:
            self.schedule.step(*args, return_outputs=False)
        return self._shared_loss(microbatch_losses, device=inputs.device)

    def evaluate(self, inputs: torch.Tensor, labels: torch.Tensor, *, loss_fn: Callable[[Any, Any], torch.Tensor]
                 ) -> torch.Tensor:
        """Forward only (the schedule's ``eval``) of one batch; every pp rank returns its mean loss."""
        self.loss.bind(loss_fn, divisor=self.microbatches)
        args = (inputs,) if self.has_first_stage else ()
        microbatch_losses: list[torch.Tensor] = []
        if self.has_last_stage:
            self.schedule.eval(*args, target=labels, losses=microbatch_losses, return_outputs=False)
        else:
            self.schedule.eval(*args, return_outputs=False)
        return self._shared_loss(microbatch_losses, device=inputs.device)

    def _shared_loss(self, microbatch_losses: list[torch.Tensor], *, device: torch.device) -> torch.Tensor:
        """The sum of the microbatch losses, broadcast from the last stage over the pp group."""
        if self.has_last_stage:
            total = torch.stack([full_tensor(loss.detach()) for loss in microbatch_losses]).sum().float()
        else:
            total = torch.zeros((), dtype=torch.float32, device=device)
        dist.broadcast(total, group=self.group, group_src=self.loss_owner)
        return total
