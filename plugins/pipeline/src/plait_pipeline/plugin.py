"""Plugin module: pipeline parallelism. Light at import; torch loads when a hook runs."""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable

from plait import hookimpl
from plait.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from plait.config import JobConfig
    from plait.job import Job
    from plait.model_spec import ModelSpec
    from plait.parallel_dims import ParallelDims
    from plait.train_state import PipelineResult, StepContext

    from plait_pipeline.schedules import ScheduleInfo
    from plait_pipeline.stages import StagePlan

PLAIT_API_VERSION = 1
PROVIDES = ("pp",)
REQUIRES = ()
DESCRIPTION = "pipeline: pipeline parallelism — GPipe, 1F1B, interleaved, zero-bubble and V schedules"

logger = logging.getLogger("plait.pipeline")


@hookimpl
def plait_add_config_sections(register: Callable[[str, type], None]) -> None:
    from plait_pipeline.config import PipelineConfig

    register("pipeline", PipelineConfig)


@dataclass(frozen=True, slots=True)
class _Layout:
    """Everything decided before any process group exists."""

    schedule: ScheduleInfo
    plan: StagePlan
    units: list[str]
    microbatches: int


def _resolve_layout(model: nn.Module, config: JobConfig, pp: int, model_spec: ModelSpec, model_args: Any) -> _Layout:
    from plait_pipeline import schedules
    from plait_pipeline.stages import check_no_shared_parameters, plan_stages, stage_units, units_of_stages

    section = config.pipeline
    info = schedules.schedule_info(section.schedule)
    units = stage_units(model, model_spec)
    plan = plan_stages(
        section,
        units=units,
        pp=pp,
        default_stages_per_rank=schedules.default_stages_per_rank(info),
        model_spec=model_spec,
        model_args=model_args,
    )
    schedules.check_stages_per_rank(info, plan.stages_per_rank)
    check_no_shared_parameters(model, units_of_stages(units, plan.split_points))
    microbatches = schedules.resolve_microbatches(section.microbatches, config.training.local_batch_size)
    schedules.check_microbatches(info, microbatches=microbatches, pp=pp, num_stages=plan.num_stages)
    return _Layout(schedule=info, plan=plan, units=units, microbatches=microbatches)


def _changed_options(section: Any) -> list[str]:
    default = type(section)()
    return [f.name for f in fields(section) if getattr(section, f.name) != getattr(default, f.name)]


@hookimpl
def plait_validate(config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec, job: Job) -> None:
    pp = parallel_dims.pp
    if pp <= 1:
        changed = _changed_options(config.pipeline)
        if changed:
            raise ConfigError(
                f"--pipeline.{changed[0]} only applies with pipeline parallelism, and this run has "
                "--parallelism.pp 1: set --parallelism.pp > 1 or drop the option"
            )
        return
    if not model_spec.token_inputs:
        raise ConfigError(
            f"model {model_spec.name!r} trains on its own data pipeline's named inputs, and pipeline "
            f"stages pass token sequences only, so it cannot run with --parallelism.pp {pp}: use "
            "--parallelism.pp 1 (shard the model with --parallelism.dp_shard instead)"
        )
    validation_batch = config.validation.local_batch_size
    if config.validation.interval and validation_batch not in (0, config.training.local_batch_size):
        raise ConfigError(
            f"--validation.local_batch_size {validation_batch}: under pipeline parallelism validation batches "
            "run through the training schedule, whose microbatches have the training batch's shape; use "
            f"--validation.local_batch_size 0 (the training's, {config.training.local_batch_size})"
        )
    layout = _resolve_layout(job.meta_model, config, pp, model_spec, job.model_args)
    if layout.schedule.splits_backward and config.compile.enable:
        raise ConfigError(
            f"schedule {layout.schedule.name} computes input and weight gradients separately (zero bubble), "
            "which torch does not support with compiled modules: drop --compile.enable or use 1F1B / "
            "Interleaved1F1B"
        )


@hookimpl
def plait_pipeline_split(
    model: nn.Module,
    config: JobConfig,
    parallel_dims: ParallelDims,
    model_spec: ModelSpec,
    device: torch.device,
    job: Job,
) -> PipelineResult | None:
    pp = parallel_dims.pp
    if pp <= 1:
        return None
    from torch.distributed.pipelining import PipelineStage

    from plait.train_state import PipelineResult

    from plait_pipeline import schedules
    from plait_pipeline.runner import MicrobatchLoss, PipelineRunner
    from plait_pipeline.stages import build_stage_module, describe_stages, units_of_stages

    layout = _resolve_layout(model, config, pp, model_spec, job.model_args)
    plan, info = layout.plan, layout.schedule
    pp_mesh = parallel_dims.get_mesh("pp")
    pp_rank, group = pp_mesh.get_local_rank(), pp_mesh.get_group()
    indices = schedules.stage_indices(info.layout, pp_rank=pp_rank, pp=pp, stages_per_rank=plan.stages_per_rank)
    units_by_stage = units_of_stages(layout.units, plan.split_points)
    parts = [
        build_stage_module(model, units=layout.units, keep=units_by_stage[index], model_spec=model_spec)
        for index in indices
    ]
    stages = [
        PipelineStage(part, index, plan.num_stages, device, group=group) for part, index in zip(parts, indices)
    ]
    loss = MicrobatchLoss()
    runner = PipelineRunner(
        schedule=schedules.build_schedule(info, stages, microbatches=layout.microbatches, loss_fn=loss),
        stage_indices=indices,
        num_stages=plan.num_stages,
        microbatches=layout.microbatches,
        loss=loss,
        group=group,
        loss_owner=schedules.loss_owner(info.layout, pp=pp, stages_per_rank=plan.stages_per_rank),
    )
    logger.info(
        "pipeline: schedule %s, %d stages (%s), %d microbatches; this rank holds stages %s",
        info.name, plan.num_stages, describe_stages(units_by_stage), layout.microbatches, indices,
    )  # fmt: skip
    return PipelineResult(
        model_parts=parts,
        schedule=runner,
        has_first_stage=runner.has_first_stage,
        has_last_stage=runner.has_last_stage,
        stage_ids=indices,
        num_stages=plan.num_stages,
        microbatches=layout.microbatches,
        microbatches_in_flight=info.microbatches_in_flight(microbatches=layout.microbatches,
                                                           num_stages=plan.num_stages),
    )


@hookimpl
def plait_forward_backward(ctx: StepContext) -> torch.Tensor | None:
    from plait_pipeline.runner import PipelineRunner

    runner = ctx.pipeline.schedule if ctx.pipeline is not None else None
    if not isinstance(runner, PipelineRunner):
        return None
    return runner.forward_backward(
        ctx.inputs, ctx.labels, loss_fn=ctx.loss_fn, grad_accumulation_steps=ctx.grad_accumulation_steps
    )


@hookimpl
def plait_evaluate(ctx: StepContext) -> torch.Tensor | None:
    from plait_pipeline.runner import PipelineRunner

    runner = ctx.pipeline.schedule if ctx.pipeline is not None else None
    if not isinstance(runner, PipelineRunner):
        return None
    return runner.evaluate(ctx.inputs, ctx.labels, loss_fn=ctx.loss_fn)
