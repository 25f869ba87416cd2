"""Plugin module: MXFP8 linears and grouped experts through torchao. Light at import;
torchao loads when a hook of an enabled run needs it."""
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
    from plait.low_precision import ModuleDecision
    from plait.model_spec import ModelSpec
    from plait.parallel_dims import ParallelDims

    from plait_mxfp8.config import Mxfp8Config

PLAIT_API_VERSION = 1
PROVIDES = ("mxfp8",)
REQUIRES = ()
DESCRIPTION = "mxfp8: MXFP8 training of linear layers and MoE grouped experts through torchao"

logger = logging.getLogger("plait.mxfp8")


@hookimpl
def plait_add_config_sections(register: Callable[[str, type], None]) -> None:
    from plait_mxfp8.config import Mxfp8Config

    register("mxfp8", Mxfp8Config)


@hookimpl
def plait_run_needs(config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec) -> RunNeeds:
    from plait_mxfp8.config import BLOCK_SIZE

    section: Mxfp8Config = config.mxfp8
    alignment = BLOCK_SIZE if section.grouped_experts else 1
    if section.emulate:
        return RunNeeds(reason=f"mxfp8 {section.recipe} (emulated)", moe_group_alignment=alignment)
    return RunNeeds(requires=("mxfp8",), requires_fix="or add --mxfp8.emulate True: MXFP8 numerics with "
                    "high-precision matmuls, not faster", reason=f"mxfp8 {section.recipe}",
                    moe_group_alignment=alignment)


def decisions_for(model: nn.Module, section: Mxfp8Config) -> list[ModuleDecision]:
    from plait.low_precision import decide_modules

    from plait_mxfp8.config import shape_rule

    return decide_modules(model, filter_fqns=section.filter_fqns, shape_rule=shape_rule,
                          grouped_experts=section.grouped_experts)


@hookimpl
def plait_validate(config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec, job: Job) -> None:
    from plait.low_precision import GROUPED_EXPERTS, refuse_converting_nothing

    from plait_mxfp8.config import BLOCK_SIZE, sm100_kernels_available

    section: Mxfp8Config = config.mxfp8
    model = f"{model_spec.name}/{config.model.flavor}"
    if not section.emulate and not sm100_kernels_available():
        raise ConfigError(
            "--plugins mxfp8 without --mxfp8.emulate needs torchao's MXFP8 kernels (its CUDA extension and "
            "triton, for SM 10.0 GPUs), and this torchao installation has none: install a CUDA build of "
            "torchao with triton, or add --mxfp8.emulate True (MXFP8 numerics, not faster)"
        )
    tokens = config.training.local_batch_size * job.tokens_per_sample // parallel_dims.cp
    if tokens % BLOCK_SIZE:
        raise ConfigError(
            f"--plugins mxfp8: a micro-batch reaches the linears as {tokens} tokens per rank "
            f"(--training.local_batch_size {config.training.local_batch_size} × {job.tokens_per_sample} positions"
            + (f" / cp {parallel_dims.cp}" if parallel_dims.cp > 1 else "")
            + f"), and MXFP8 scales blocks of {BLOCK_SIZE} tokens in the backward: choose "
            f"--training.local_batch_size × --training.seq_len a multiple of {BLOCK_SIZE * parallel_dims.cp}"
        )
    decisions = decisions_for(job.meta_model, section)
    unaligned = [d for d in decisions if not d.converted and d.reason.startswith("in/out features")]
    if unaligned:
        names = "\n".join(f"  {d.path} ({d.kind} {d.in_features}->{d.out_features})" for d in unaligned)
        patterns = ",".join([*section.filter_fqns, *(d.path for d in unaligned)])
        raise ConfigError(
            f"--plugins mxfp8: these modules of {model} have features that are not multiples of {BLOCK_SIZE} "
            f"(the MXFP8 block size):\n{names}\nkeep them in high precision with --mxfp8.filter_fqns {patterns}"
        )
    if (section.recipe == "rceil_wgrad_with_hp" and config.training.dtype != "bfloat16"
            and any(d.converted and d.kind == GROUPED_EXPERTS for d in decisions)):
        raise ConfigError(
            "--mxfp8.recipe rceil_wgrad_with_hp computes the experts' weight gradients from bfloat16 output "
            f"gradients and the {config.training.dtype} activations, which torchao's grouped matmul refuses: "
            "add --training.dtype bfloat16, or --mxfp8.grouped_experts False, or use --mxfp8.recipe rceil"
        )
    refuse_converting_nothing("mxfp8", model, decisions)


@hookimpl
def plait_convert_model(model: nn.Module, config: JobConfig, model_spec: ModelSpec) -> None:
    from plait.low_precision import GROUPED_EXPERTS, converted_paths, log_table_once

    from plait_mxfp8.convert import convert_grouped_experts, convert_linears

    section: Mxfp8Config = config.mxfp8
    decisions = decisions_for(model, section)
    log_table_once(logger, f"mxfp8 {section.recipe}", decisions, config)
    convert_linears(model, converted_paths(decisions), section)
    convert_grouped_experts(model, converted_paths(decisions, GROUPED_EXPERTS), section)
