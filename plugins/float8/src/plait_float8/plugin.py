"""Plugin module: float8 linears through torchao. Light at import; torchao loads when a
hook of an enabled run needs it."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

from plait import hookimpl
from plait.errors import ConfigError
from plait.train_state import RunNeeds

if TYPE_CHECKING:
    from collections.abc import Mapping

    from torch import nn

    from plait.config import JobConfig
    from plait.job import Job
    from plait.model_spec import ModelSpec
    from plait.parallel_dims import ParallelDims
    from plait.train_state import StepContext

    from plait_float8.config import Float8Config

PLAIT_API_VERSION = 1
PROVIDES = ("float8",)
REQUIRES = ()
DESCRIPTION = "float8: float8 training of linear layers through torchao (tensorwise, rowwise, rowwise_with_gw_hp)"

logger = logging.getLogger("plait.float8")

#: The float8 pair of this process's device, chosen in ``plait_validate`` (which runs before
#: any conversion in every process) from the device's capabilities.
_device_dtypes: tuple[str, str] | None = None


@hookimpl
def plait_add_config_sections(register: Callable[[str, type], None]) -> None:
    from plait_float8.config import Float8Config

    register("float8", Float8Config)


@hookimpl
def plait_run_needs(config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec) -> RunNeeds:
    from plait_float8.config import GROUP_ALIGNMENT

    section: Float8Config = config.float8
    if section.emulate:
        return RunNeeds(reason=f"float8 {section.recipe} (emulated)")
    return RunNeeds(requires=("float8_matmul",), requires_fix="or add --float8.emulate True: float8 numerics "
                    "with high-precision matmuls, not faster", reason=f"float8 {section.recipe}",
                    moe_group_alignment=GROUP_ALIGNMENT if section.grouped_experts else 1)


def decisions_for(model: nn.Module, section: Float8Config):  # noqa: ANN201
    from plait.low_precision import decide_modules

    from plait_float8.config import experts_shape_rule, shape_rule

    return decide_modules(model, filter_fqns=section.filter_fqns, shape_rule=shape_rule(section),
                          grouped_experts=section.grouped_experts, experts_shape_rule=experts_shape_rule)


@hookimpl
def plait_validate(config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec, job: Job) -> None:
    global _device_dtypes
    from plait.low_precision import refuse_converting_nothing

    section: Float8Config = config.float8
    if section.fsdp_float8_all_gather and not parallel_dims.fsdp_enabled:
        raise ConfigError(
            "--float8.fsdp_float8_all_gather applies to FSDP's all-gather, and this run does not shard "
            "parameters (dp_shard × cp = 1): add --plugins fsdp --parallelism.dp_shard N (N > 1), "
            "or drop the option"
        )
    if section.grouped_experts:
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            raise ConfigError("--float8.grouped_experts needs triton (torchao's float8 grouped GEMM casts with "
                              "triton kernels), which is not installed: install triton, or drop the option")
    dtypes = tuple(job.device.capabilities.float8_dtypes)
    _device_dtypes = (dtypes[0], dtypes[1]) if len(dtypes) == 2 else None
    hint = " (or --float8.auto_filter False for small models)" if section.auto_filter else ""
    refuse_converting_nothing("float8", f"{model_spec.name}/{config.model.flavor}",
                              decisions_for(job.meta_model, section), hint=hint)


@hookimpl
def plait_convert_model(model: nn.Module, config: JobConfig, model_spec: ModelSpec) -> None:
    from torchao.float8 import convert_to_float8_training

    from plait.low_precision import GROUPED_EXPERTS, converted_paths, log_table_once

    from plait_float8.config import DEFAULT_DTYPES, grouped_op_config, torchao_config

    section: Float8Config = config.float8
    decisions = decisions_for(model, section)
    logged_now = log_table_once(logger, f"float8 {section.recipe}", decisions, config)
    chosen = converted_paths(decisions)
    convert_to_float8_training(
        model,
        module_filter_fn=lambda module, path: path in chosen,
        config=torchao_config(section, _device_dtypes or DEFAULT_DTYPES),
    )
    if config.parallelism.tp > 1 and model_spec.tp_plan is not None:
        _choose_tp_styles(model, section, model_spec.tp_plan.styles, log=logged_now)
    experts = converted_paths(decisions, GROUPED_EXPERTS)
    if experts:
        from torchao.quantization import quantize_

        op_config = grouped_op_config(_device_dtypes or DEFAULT_DTYPES)
        for path in experts:
            quantize_(model.get_submodule(path), op_config, filter_fn=lambda module, fqn: True)
    if section.recipe != "tensorwise" and config.compile.enable and config.activation_checkpoint.mode != "none":
        # Recomputed (AC) and compiled casts must round exactly like eager ones, or the
        # rowwise scales of forward and recomputation differ.
        import torch._inductor.config as inductor_config

        inductor_config.emulate_precision_casts = True


def _choose_tp_styles(model: nn.Module, section: Float8Config, plan_styles: Mapping[str, str], *, log: bool) -> None:
    from plait_float8.config import DEFAULT_DTYPES
    from plait_float8.tensor_parallel import gather_float8_as_bytes, mark_float8_styles, why_not_float8_styles

    reason = why_not_float8_styles(section, (_device_dtypes or DEFAULT_DTYPES)[0])
    if reason is not None:
        if log:
            logger.info("float8 under tensor parallelism with torch's plain styles: %s", reason)
        return
    marked = mark_float8_styles(model, plan_styles)
    gather_float8_as_bytes()
    if log:
        logger.info("float8 tensor-parallel styles on %d modules (activations all-gathered in float8)", len(marked))


@hookimpl
def plait_after_optimizer_step(ctx: StepContext) -> None:
    """With float8 all-gather, the weights' scales are computed once per step, for all
    weights in one all-reduce, after the optimizer changed them."""
    if not ctx.config.float8.fsdp_float8_all_gather:
        return
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    for part in ctx.model_parts:
        precompute_float8_dynamic_scale_for_fsdp(part)
