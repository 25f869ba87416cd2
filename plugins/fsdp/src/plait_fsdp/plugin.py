"""Plugin module: light at import; torch.distributed is imported when a hook runs."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Iterator

from plait import hookimpl
from plait.errors import ConfigError
from plait.train_state import RunNeeds

if TYPE_CHECKING:
    from plait.config import JobConfig
    from plait.model_spec import ModelSpec
    from plait.parallel_dims import ParallelDims
    from plait.train_state import StepContext
    from torch import nn

PLAIT_API_VERSION = 1
PROVIDES = ("dp_shard", "dp_replicate")
REQUIRES = ()
DESCRIPTION = "fsdp: data parallelism — FSDP2 sharding, HSDP, DDP-style replication"


@hookimpl
def plait_add_config_sections(register: Callable[[str, type], None]) -> None:
    from plait_fsdp.config import FSDPConfig

    register("fsdp", FSDPConfig)


@hookimpl
def plait_run_needs(config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec) -> RunNeeds | None:
    """Sharded parameters are cast to --training.dtype by FSDP's mixed-precision policy
    (fp32 master weights), so the core's autocast stays off."""
    if not parallel_dims.fsdp_enabled:
        return None
    return RunNeeds(applies_compute_dtype=True)


@hookimpl
def plait_validate(config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec) -> None:
    section = config.fsdp
    sharded = parallel_dims.fsdp_enabled
    if section.cpu_offload and not sharded:
        raise ConfigError(
            "--fsdp.cpu_offload needs sharded parameters: set --parallelism.dp_shard (or cp) > 1, "
            "or drop --fsdp.cpu_offload"
        )
    if section.cpu_offload and parallel_dims.tp_enabled:
        raise ConfigError(
            "--fsdp.cpu_offload does not support tensor parallelism (--parallelism.tp "
            f"{parallel_dims.tp}): drop --fsdp.cpu_offload or set --parallelism.tp 1"
        )
    if section.reshard_after_forward != "default" and not sharded:
        raise ConfigError(
            f"--fsdp.reshard_after_forward {section.reshard_after_forward} only applies to sharded "
            "parameters, and this run does not shard (dp_shard × cp = 1): drop the option or set "
            "--parallelism.dp_shard > 1"
        )


@hookimpl
def plait_apply_data_parallel(
    model: nn.Module, config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec
) -> None:
    from plait_fsdp.parallelize import apply_data_parallel

    apply_data_parallel(model, config, parallel_dims, model_spec)


@contextlib.contextmanager
def _gradient_sync_only_on_last(ctx: StepContext, is_last: bool) -> Iterator[None]:
    from plait_fsdp.parallelize import set_gradient_sync

    set_gradient_sync(ctx.model_parts, is_last)
    try:
        yield
    finally:
        if not is_last:
            set_gradient_sync(ctx.model_parts, True)


@hookimpl
def plait_train_context(config: JobConfig, parallel_dims: ParallelDims, ctx: StepContext) -> Any:
    """With gradient accumulation, reduce gradients only in the last micro-batch's backward."""
    if ctx.grad_accumulation_steps <= 1 or not (parallel_dims.dp_enabled or parallel_dims.fsdp_enabled):
        return None
    return _gradient_sync_only_on_last(ctx, is_last=ctx.is_last_micro_batch)
