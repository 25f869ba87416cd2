"""Plugin module: float8 linears through torchao. Light at import; torchao loads when a
hook of an enabled run needs it."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

from plait import hookimpl
from plait.errors import ConfigError
from plait.train_state import RunNeeds

if TYPE_CHECKING:
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
#: The config whose table of converted and skipped linears was logged (once per run).
_logged_config: int | None = None


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
    from plait.low_precision import format_table

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
    decisions = decisions_for(job.meta_model, section)
    if not any(d.converted for d in decisions):
        hint = " (or --float8.auto_filter False for small models)" if section.auto_filter else ""
        raise ConfigError(
            f"--plugins float8 would convert no linear layer of {model_spec.name}/{config.model.flavor}:\n"
            + format_table("float8", decisions)
            + f"\nrelax --float8.filter_fqns{hint}, or drop float8 from --plugins"
        )


@hookimpl
def plait_convert_model(model: nn.Module, config: JobConfig, model_spec: ModelSpec) -> None:
    from torchao.float8 import convert_to_float8_training

    from plait.low_precision import GROUPED_EXPERTS, converted_paths, format_table

    from plait_float8.config import DEFAULT_DTYPES, grouped_op_config, torchao_config

    global _logged_config
    section: Float8Config = config.float8
    decisions = decisions_for(model, section)
    if _logged_config != id(config):
        _logged_config = id(config)
        logger.info("%s", format_table(f"float8 {section.recipe}", decisions))
    chosen = converted_paths(decisions)
    convert_to_float8_training(
        model,
        module_filter_fn=lambda module, path: path in chosen,
        config=torchao_config(section, _device_dtypes or DEFAULT_DTYPES),
    )
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


@hookimpl
def plait_after_optimizer_step(ctx: StepContext) -> None:
    """With float8 all-gather, the weights' scales are computed once per step, for all
    weights in one all-reduce, after the optimizer changed them."""
    if not ctx.config.float8.fsdp_float8_all_gather:
        return
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    for part in ctx.model_parts:
        precompute_float8_dynamic_scale_for_fsdp(part)
