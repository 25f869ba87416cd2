"""Plugin module: context parallelism. Light at import; torch's context-parallel APIs
load when a run uses them."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

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

    from plait_context_parallel.config import ContextParallelConfig

PLAIT_API_VERSION = 1
PROVIDES = ("cp",)
REQUIRES = ("fsdp",)  # gradients are reduced over dp_shard × cp by FSDP
DESCRIPTION = "context-parallel: sequence sharding over cp ranks, ring attention, head-tail load balancing"

logger = logging.getLogger("plait.context_parallel")


@hookimpl
def plait_add_config_sections(register: Callable[[str, type], None]) -> None:
    from plait_context_parallel.config import ContextParallelConfig

    register("context_parallel", ContextParallelConfig)


def _section(config: JobConfig) -> ContextParallelConfig:
    from plait_context_parallel.config import ContextParallelConfig

    return getattr(config, "context_parallel", None) or ContextParallelConfig()


@hookimpl
def plait_run_needs(config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec) -> RunNeeds | None:
    """Head-tail load balancing cuts each sequence into 2 × cp equal chunks."""
    if parallel_dims.cp <= 1:
        return None
    cp = parallel_dims.cp
    return RunNeeds(sequence_splits=2 * cp, reason=f"load-balanced context parallelism (2 × cp = {2 * cp} chunks)")


@hookimpl
def plait_validate(config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec, job: Job) -> None:
    cp = parallel_dims.cp
    if cp <= 1:
        return
    if not model_spec.token_inputs and not model_spec.cp_sequence_inputs:
        raise ConfigError(
            f"model {model_spec.name!r} trains on its own data pipeline's named inputs and names none "
            f"of them as a sequence (its spec's cp_sequence_inputs is empty), so context parallelism "
            f"cannot shard it: use --parallelism.cp 1 (shard the model with --parallelism.dp_shard "
            "instead), or declare cp_sequence_inputs in its ModelSpec"
        )
    if not model_spec.token_inputs and model_spec.cp_sequence_buffers:
        raise ConfigError(
            f"model {model_spec.name!r} declares cp_sequence_buffers, which context parallelism cuts "
            "for a token sequence only; a model with its own data pipeline computes its positions from "
            "its named inputs (cp_sequence_inputs): fix its ModelSpec, or use --parallelism.cp 1"
        )
    if model_spec.sequence_indexed_parameters:
        raise ConfigError(
            f"model {model_spec.name!r} has parameters indexed by sequence position "
            f"({', '.join(model_spec.sequence_indexed_parameters)}, e.g. a learned position table), which "
            f"context parallelism cannot split along with the sequence: use --parallelism.cp 1"
        )
    if model_spec.cp_attention is None:
        raise ConfigError(
            f"model {model_spec.name!r} does not support context parallelism (its spec sets "
            f"cp_attention=None), so it cannot run with --parallelism.cp {cp}: use --parallelism.cp 1, "
            "or give its ModelSpec a cp_attention ('sdpa' or 'flex') and cp_attention_modules"
        )
    if not model_spec.cp_attention_modules:
        raise ConfigError(
            f"model {model_spec.name!r} sets cp_attention={model_spec.cp_attention!r} but names no "
            "cp_attention_modules, so context parallelism cannot find its attention: add the module "
            "path patterns to its ModelSpec (e.g. cp_attention_modules=('layers.*.attention.sdpa',))"
        )
    section = _section(config)  # its own validate() checked the values
    if model_spec.cp_attention == "flex" and section.rotate_method != "allgather":
        raise ConfigError(
            f"--context_parallel.rotate_method {section.rotate_method} applies to SDPA ring attention "
            f"only; model {model_spec.name!r} uses flex attention, which all-gathers keys and values: "
            "use --context_parallel.rotate_method allgather"
        )
    if model_spec.cp_attention == "sdpa" and job.device.type == "cpu":
        # torch's ring attention maps the GPU attention kernels only; on CPU it needs our routes
        from plait_context_parallel.cpu_ring_attention import check_supported

        check_supported()


@hookimpl
def plait_apply_context_parallel(
    model: nn.Module, config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec
) -> None:
    if parallel_dims.cp <= 1:
        return
    from plait_context_parallel.attention import set_rotate_method
    from plait_context_parallel.micro_batch import prepare_chunk

    cp_mesh = parallel_dims.get_mesh("cp")
    if cp_mesh.device_type == "cpu" and model_spec.cp_attention == "sdpa":
        from plait_context_parallel import cpu_ring_attention

        cpu_ring_attention.install()
    rotate_method = _section(config).rotate_method
    set_rotate_method(rotate_method)
    prepared = prepare_chunk(model, cp_mesh, model_spec)
    logger.info(
        "context parallel over %d ranks: %d %s attention modules, sequence buffers %s, rotate %s",
        parallel_dims.cp, len(prepared.attention_paths), model_spec.cp_attention,
        [f"{b.name} (dim {b.seq_dim})" for b in prepared.sequence_buffers], rotate_method,
    )  # fmt: skip


@hookimpl
def plait_train_context(config: JobConfig, parallel_dims: ParallelDims, ctx: StepContext) -> Any:
    if parallel_dims.cp <= 1:
        return None
    from plait_context_parallel.micro_batch import context_parallel_micro_batch

    return context_parallel_micro_batch(ctx, parallel_dims.get_mesh("cp"))
