"""Plugin module: light at import; torch and torchft are imported when a hook runs."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from plait import hookimpl
from plait.errors import ConfigError
from plait.train_state import RunNeeds

if TYPE_CHECKING:
    from plait.config import JobConfig
    from plait.model_spec import ModelSpec
    from plait.parallel_dims import ParallelDims
    from plait.train_state import StepContext

    from plait_torchft.runtime import FaultTolerance

PLAIT_API_VERSION = 1
PROVIDES = ("fault-tolerance",)
REQUIRES = ("fsdp",)
DESCRIPTION = "torchft: fault-tolerant replica groups (torchft) — sync HSDP, LocalSGD, DiLoCo; survives a lost group"

#: The replica group that writes the run's persistent checkpoints.
CHECKPOINT_WRITER = 0

_runtime: FaultTolerance | None = None  # this process's replica-group runtime, built with the optimizer


def replica_folder(replica_group: int) -> str:
    return f"replica_{replica_group}"


@hookimpl
def plait_add_config_sections(register: Callable[[str, type], None]) -> None:
    from plait_torchft.config import TorchFTConfig

    register("torchft", TorchFTConfig)


@hookimpl
def plait_run_needs(config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec) -> RunNeeds:
    """Each global batch is sharded over every replica group's data-parallel ranks; each
    group writes its outputs to its own folder, and group 0 alone writes the checkpoints
    of the run (the others resume from them, then heal from a live peer)."""
    section = config.torchft
    return RunNeeds(replica_groups=section.replica_groups, replica_group=section.replica_group,
                    job_folder=replica_folder(section.replica_group),
                    writes_checkpoints=section.replica_group == CHECKPOINT_WRITER,
                    reason=f"torchft replica group {section.replica_group} of {section.replica_groups}")


@hookimpl
def plait_validate(config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec) -> None:
    from plait_torchft.runtime import lighthouse_address

    section = config.torchft
    section.check_timeouts(config.job.pg_timeout_seconds)
    lighthouse_address(section)
    if section.backend == "nccl":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--torchft.backend nccl needs CUDA devices; on this machine use gloo (or auto)")


@hookimpl
def plait_wrap_optimizer(optimizer: Any, model_parts: list[Any], config: JobConfig) -> Any:
    global _runtime
    from plait_torchft.runtime import FaultTolerance

    if _runtime is not None:
        _runtime.close()
    device_type = next(p for part in model_parts for p in part.parameters()).device.type
    _runtime = FaultTolerance(config, device_type)
    return _runtime.wrap_optimizer(optimizer, model_parts)


@hookimpl
def plait_checkpoint_state(config: JobConfig) -> dict[str, Any]:
    from plait_torchft.runtime import STATE_KEY

    assert _runtime is not None, "plait_wrap_optimizer builds the runtime before checkpoint states are collected"
    return {STATE_KEY: _runtime.counters}


@hookimpl
def plait_train_step(ctx: StepContext) -> Any:
    """Replaces the core's step by the core's own step function run under torchft's
    quorum and commit vote (retried on the same batch when a step is discarded)."""
    assert _runtime is not None
    if _runtime.semisync is not None:
        return _runtime.semisync_step(ctx)
    return _runtime.train_step(ctx)


@hookimpl
def plait_gradients_ready(ctx: StepContext) -> None:
    if _runtime is not None and _runtime.semisync is None:
        _runtime.average_gradients(ctx)


@hookimpl
def plait_train_end(config: JobConfig, result: Any, error: BaseException | None) -> None:
    global _runtime
    if _runtime is not None:
        _runtime.close()
        _runtime = None
