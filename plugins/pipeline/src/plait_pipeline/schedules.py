"""The schedules this plugin offers: which stages each rank holds, the microbatch counts
each accepts, and the torch class that runs it. Pure data and arithmetic; torch's
pipelining module is imported only to build a schedule."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from plait.errors import ConfigError

if TYPE_CHECKING:
    from torch.distributed.pipelining.stage import PipelineStage


class StageLayout(enum.Enum):
    SINGLE = "single"
    """One stage per rank: rank r holds stage r."""
    LOOPED = "looped"
    """k stages per rank, round robin: rank r holds stages r, r + pp, r + 2 pp, ..."""
    V = "v"
    """Two stages per rank, down and back up: rank r holds stages r and 2 pp - 1 - r."""


@dataclass(frozen=True, slots=True)
class ScheduleInfo:
    name: str
    torch_class: str
    layout: StageLayout
    splits_backward: bool = False
    """Computes input and weight gradients separately (zero bubble), which torch does not
    support on compiled modules."""
    forwards_all_first: bool = False
    """Runs every microbatch's forward before the first backward, so a rank holds the
    activations of all of them (GPipe, breadth-first); the others start backwards early
    and hold about one microbatch per stage ahead of them."""

    def microbatches_in_flight(self, *, microbatches: int, num_stages: int) -> int:
        return microbatches if self.forwards_all_first else min(microbatches, num_stages)


SCHEDULES: dict[str, ScheduleInfo] = {
    info.name: info
    for info in (
        ScheduleInfo(name="GPipe", torch_class="ScheduleGPipe", layout=StageLayout.SINGLE, forwards_all_first=True),
        ScheduleInfo(name="1F1B", torch_class="Schedule1F1B", layout=StageLayout.SINGLE),
        ScheduleInfo(name="Interleaved1F1B", torch_class="ScheduleInterleaved1F1B", layout=StageLayout.LOOPED),
        ScheduleInfo(
            name="LoopedBFS", torch_class="ScheduleLoopedBFS", layout=StageLayout.LOOPED, forwards_all_first=True
        ),
        ScheduleInfo(
            name="InterleavedZeroBubble",
            torch_class="ScheduleInterleavedZeroBubble",
            layout=StageLayout.LOOPED,
            splits_backward=True,
        ),
        ScheduleInfo(name="ZBVZeroBubble", torch_class="ScheduleZBVZeroBubble", layout=StageLayout.V, splits_backward=True),
        ScheduleInfo(name="DualPipeV", torch_class="ScheduleDualPipeV", layout=StageLayout.V, splits_backward=True),
    )
}


def schedule_info(name: str) -> ScheduleInfo:
    if name not in SCHEDULES:
        raise ConfigError(
            f"--pipeline.schedule {name!r} is not a known schedule; choose one of: {', '.join(SCHEDULES)}"
        )
    return SCHEDULES[name]


def default_stages_per_rank(info: ScheduleInfo) -> int:
    return 1 if info.layout is StageLayout.SINGLE else 2


def check_stages_per_rank(info: ScheduleInfo, stages_per_rank: int) -> None:
    if info.layout is StageLayout.SINGLE and stages_per_rank != 1:
        raise ConfigError(
            f"schedule {info.name} runs one stage per rank, but the split gives {stages_per_rank} stages "
            f"per rank: use --pipeline.schedule Interleaved1F1B (or another multi-stage schedule), or a "
            f"split with --parallelism.pp stages"
        )
    if info.layout is StageLayout.LOOPED and stages_per_rank < 2:
        raise ConfigError(
            f"schedule {info.name} interleaves several stages per rank, but the split gives "
            f"{stages_per_rank}: set --pipeline.stages_per_rank 2 (or more), or use --pipeline.schedule 1F1B"
        )
    if info.layout is StageLayout.V and stages_per_rank != 2:
        raise ConfigError(
            f"schedule {info.name} holds exactly 2 stages per rank (a V: stages r and 2*pp-1-r), but the "
            f"split gives {stages_per_rank}: use --pipeline.stages_per_rank 2 (2 * pp stages in all)"
        )


def stage_indices(layout: StageLayout, *, pp_rank: int, pp: int, stages_per_rank: int) -> list[int]:
    """The stages rank ``pp_rank`` of ``pp`` holds, in the order it runs them forward."""
    if layout is StageLayout.SINGLE:
        return [pp_rank]
    if layout is StageLayout.V:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(stages_per_rank)]


def resolve_microbatches(requested: int, local_batch_size: int) -> int:
    """The number of pipeline microbatches; each takes ``local_batch_size / n`` sequences."""
    microbatches = requested or local_batch_size
    if local_batch_size % microbatches:
        divisors = [d for d in range(1, local_batch_size + 1) if local_batch_size % d == 0]
        raise ConfigError(
            f"--pipeline.microbatches {microbatches} does not divide --training.local_batch_size "
            f"{local_batch_size} (each microbatch takes an equal share of the local batch): use one of "
            f"{', '.join(map(str, divisors))}, or change the local batch size"
        )
    return microbatches


def check_microbatches(info: ScheduleInfo, *, microbatches: int, pp: int, num_stages: int) -> None:
    """The microbatch counts torch's schedules accept (measured on torch 2.13)."""
    if info.name == "1F1B" and microbatches < pp:
        raise ConfigError(
            f"schedule 1F1B needs at least as many microbatches as stages ({pp}), got {microbatches}: "
            f"raise --pipeline.microbatches (and --training.local_batch_size) to >= {pp}, or use GPipe"
        )
    if info.name == "DualPipeV" and microbatches < num_stages:
        raise ConfigError(
            f"schedule DualPipeV needs at least as many microbatches as stages ({num_stages}), got "
            f"{microbatches}: raise --pipeline.microbatches (and --training.local_batch_size) to >= "
            f"{num_stages}"
        )
    if info.name in ("Interleaved1F1B", "InterleavedZeroBubble"):
        rounds = max(1, microbatches // pp)
        if microbatches % rounds:
            raise ConfigError(
                f"schedule {info.name} runs {microbatches} microbatches in microbatches // pp = {rounds} rounds, "
                f"which must divide them: use a multiple of pp (e.g. --pipeline.microbatches {rounds * pp}) "
                f"or fewer than {2 * pp} microbatches"
            )


def loss_owner(layout: StageLayout, *, pp: int, stages_per_rank: int) -> int:
    """The pp rank that holds the last stage (and so computes the loss)."""
    last = pp * stages_per_rank - 1
    return next(
        rank for rank in range(pp)
        if last in stage_indices(layout, pp_rank=rank, pp=pp, stages_per_rank=stages_per_rank)
    )  # fmt: skip


def build_schedule(
    info: ScheduleInfo,
    stages: list[PipelineStage],
    *,
    microbatches: int,
    loss_fn: Callable[[Any, Any], Any],
) -> Any:
    """The torch schedule. Gradients are not rescaled by the schedule (``scale_grads=False``):
    ``loss_fn`` already divides each microbatch's loss by the number of microbatches, so
    gradients accumulated over several schedule steps (gradient accumulation) stay right."""
    import torch.distributed.pipelining as pipelining

    schedule_class = getattr(pipelining, info.torch_class)
    runs_one_stage = info.layout is StageLayout.SINGLE
    return schedule_class(
        stages[0] if runs_one_stage else stages,
        n_microbatches=microbatches,
        loss_fn=loss_fn,
        scale_grads=False,
    )
