"""Plugin module: tensor parallelism (with sequence and loss parallelism) from the model
spec's TP plan. Light at import; torch's parallel APIs load when a run uses them."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, get_args

from plait import hookimpl
from plait.errors import ConfigError
from plait.model_spec import TPStyle, dotted_attribute
from plait.train_state import RunNeeds

if TYPE_CHECKING:
    from torch import nn

    from plait.config import JobConfig
    from plait.job import Job
    from plait.model_spec import ModelSpec
    from plait.parallel_dims import ParallelDims
    from plait.train_state import StepContext

PLAIT_API_VERSION = 1
PROVIDES = ("tp",)
REQUIRES = ()
DESCRIPTION = "tp: tensor parallelism with sequence parallelism and loss parallelism"

logger = logging.getLogger("plait.tp")

KNOWN_STYLES: tuple[str, ...] = get_args(TPStyle)


@dataclass(kw_only=True, slots=True)
class TPConfig:
    sequence_parallel: bool = True
    """Run norms on sequence shards (less activation memory, same collectives volume)."""
    loss_parallel: bool = True
    """Compute cross-entropy on vocabulary-sharded logits instead of gathering them."""
    async_tp: bool = False
    """Overlap TP collectives with matmuls (devices with symmetric memory, with --compile.enable)."""


@hookimpl
def plait_add_config_sections(register: Callable[[str, type], None]) -> None:
    register("tp", TPConfig)


def _tp_config(config: JobConfig) -> TPConfig:
    return getattr(config, "tp", None) or TPConfig()


def _valid_degrees(values: dict[str, int]) -> list[int]:
    return [d for d in range(1, max(values.values()) + 1) if all(v % d == 0 for v in values.values())]


def check_divisibility(tp: int, model_spec: ModelSpec, args: Any, flavor: str) -> None:
    plan = model_spec.tp_plan
    assert plan is not None
    values = {name: int(value) for name in plan.divisible_by_tp if (value := dotted_attribute(args, name)) is not None}
    for name, value in values.items():
        if value % tp:
            valid = ", ".join(str(d) for d in _valid_degrees(values))
            raise ConfigError(
                f"--parallelism.tp {tp} does not divide {name} = {value} of "
                f"{model_spec.name}/{flavor}: tensor parallelism splits it evenly over the tp "
                f"ranks; use a tp degree that divides {', '.join(values)} (valid: {valid})"
            )


def check_plan_covers_model(model_spec: ModelSpec, meta_model: nn.Module, tp: int) -> None:
    """Every parameter is distributed by the plan (or explicitly replicated); otherwise the
    run would fail in its first step mixing plain tensors and DTensors."""
    import re

    from plait_tp.plan import uncovered_parameters

    assert model_spec.tp_plan is not None
    plan = model_spec.tp_plan
    missing = uncovered_parameters(meta_model, plan.styles, plan.extra_covers)
    if not missing:
        return
    names = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", name) for name in missing))
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    raise ConfigError(
        f"the tp_plan of model {model_spec.name!r} does not cover {len(missing)} parameter(s): {shown}. "
        f"Give their modules a style in the model spec's tp_plan ('colwise'/'rowwise' for a linear "
        f"layer split over the ranks, 'replicate' for parameters every rank keeps whole), or run with "
        f"--parallelism.tp 1 (tp is {tp} now)"
    )


@hookimpl
def plait_run_needs(config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec) -> RunNeeds | None:
    """Sequence parallelism cuts each sequence into tp equal shards; async TP needs the
    device's symmetric memory."""
    tp = parallel_dims.tp
    if tp <= 1:
        return None
    options = _tp_config(config)
    return RunNeeds(
        sequence_splits=tp if options.sequence_parallel else 1,
        reason=f"sequence parallelism (tp = {tp} shards)",
        requires=("symmetric_memory",) if options.async_tp else (),
        requires_fix="drop --tp.async_tp",
    )


@hookimpl
def plait_validate(config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec, job: Job) -> None:
    tp = parallel_dims.tp
    if tp <= 1:
        return
    if model_spec.tp_plan is None:
        raise ConfigError(
            f"model {model_spec.name!r} declares no tensor-parallel plan (tp_plan), so it cannot run "
            f"with --parallelism.tp {tp}: use --parallelism.tp 1, or add a tp_plan to its ModelSpec"
        )
    unknown = sorted({style for style in model_spec.tp_plan.styles.values() if style not in KNOWN_STYLES})
    if unknown:
        raise ConfigError(
            f"model {model_spec.name!r}: its tp_plan uses unknown style(s) {', '.join(unknown)}; "
            f"the tp plugin knows: {', '.join(KNOWN_STYLES)}"
        )
    flavor = config.model.flavor
    args = job.model_args
    check_divisibility(tp, model_spec, args, flavor)
    if getattr(args, "tie_word_embeddings", False):
        raise ConfigError(
            f"{model_spec.name}/{flavor} ties its embedding to the LM head (tie_word_embeddings), "
            f"which tensor parallelism shards differently (vocab rows vs. output columns): use "
            f"--parallelism.tp 1 for this model"
        )
    check_plan_covers_model(model_spec, job.meta_model, tp)
    options = _tp_config(config)
    if options.sequence_parallel and not model_spec.tp_plan.sequence_parallel:
        raise ConfigError(
            f"model {model_spec.name!r} shards its layers over the tp ranks but keeps the activations "
            f"between them whole (its tp_plan has no sequence-parallel layout): add "
            f"--tp.sequence_parallel False to run it with --parallelism.tp {tp}"
        )
    if options.sequence_parallel and model_spec.sequence_indexed_parameters:
        raise ConfigError(
            f"{model_spec.name} adds parameters indexed by sequence position "
            f"({', '.join(model_spec.sequence_indexed_parameters)}, e.g. a learned position table) to "
            f"activations that sequence parallelism splits along the sequence over the tp ranks: "
            f"add --tp.sequence_parallel False"
        )
    if options.async_tp:  # the device's symmetric memory is declared in plait_run_needs
        if not config.compile.enable:
            raise ConfigError(
                "--tp.async_tp overlaps collectives inside compiled graphs: add --compile.enable "
                "or drop --tp.async_tp"
            )


@hookimpl
def plait_apply_tensor_parallel(
    model: nn.Module, config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec
) -> None:
    if parallel_dims.tp <= 1:
        return
    from plait_tp.plan import StyleOptions, apply_plan

    assert model_spec.tp_plan is not None  # plait_validate refused otherwise
    options = _tp_config(config)
    tp_mesh = parallel_dims.get_mesh("tp")
    applied = apply_plan(
        model,
        tp_mesh,
        model_spec.tp_plan.styles,
        StyleOptions(
            sequence_parallel=options.sequence_parallel,
            loss_parallel=options.loss_parallel,
            expert_parallel=parallel_dims.ep_enabled,
        ),
    )
    if model_spec.tp_plan.extra is not None:
        model_spec.tp_plan.extra(model, tp_mesh)
    if options.async_tp:
        _enable_async_tp()
    logger.info(
        "tensor parallel over %d ranks on %d modules (sequence parallel %s, loss parallel %s, async %s)",
        parallel_dims.tp, len(applied), options.sequence_parallel, options.loss_parallel, options.async_tp,
    )


def _enable_async_tp() -> None:
    """Let inductor fuse TP collectives with the neighbouring matmuls. Symmetric memory
    is set up on demand by torch (>= 2.13 deprecates enabling it per group)."""
    import torch._inductor.config as inductor_config

    inductor_config._micro_pipeline_tp = True


@hookimpl
def plait_train_context(config: JobConfig, parallel_dims: ParallelDims, ctx: StepContext) -> Any:
    if parallel_dims.tp <= 1 or not _tp_config(config).loss_parallel:
        return None
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()
