"""Plugin module: light at import; torch.distributed is imported when a hook runs.

With ``--parallelism.ep N`` (N > 1) the experts of every MoE layer are sharded over the
``ep`` mesh and MoE layers dispatch their tokens by all-to-all; the fsdp plugin shards
the expert slices over ``efsdp`` and the other parameters over ``dp_shard_cp``. With
ep 1 the plugin does nothing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from plait import hookimpl
from plait.errors import ConfigError
from plait.train_state import RunNeeds

if TYPE_CHECKING:
    from plait.config import JobConfig
    from plait.job import Job
    from plait.model_spec import ModelSpec
    from plait.parallel_dims import ParallelDims
    from torch import nn

PLAIT_API_VERSION = 1
PROVIDES = ("ep",)
REQUIRES = ("fsdp",)
DESCRIPTION = "ep: expert parallelism — experts sharded over ranks, all-to-all token dispatch"


@hookimpl
def plait_run_needs(config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec) -> RunNeeds | None:
    """The experts become an FSDP unit of their own inside each MoE block, whose hooks
    compiled code does not trace: blocks compile with graph breaks allowed."""
    if parallel_dims.ep <= 1:
        return None
    return RunNeeds(compile_fullgraph=False)


@hookimpl
def plait_validate(config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec, job: Job) -> None:
    ep = parallel_dims.ep
    if ep <= 1:
        return
    model = f"{model_spec.name}/{config.model.flavor}"
    if not model_spec.expert_modules:
        raise ConfigError(
            f"--parallelism.ep {ep}: model {model_spec.name!r} declares no expert modules (it is a dense "
            "model), so there is nothing to shard over ep; use --parallelism.ep 1 or a mixture-of-experts model"
        )
    counts = _expert_counts(job.meta_model, model_spec)
    if not counts:
        raise ConfigError(
            f"--parallelism.ep {ep}: {model} has no expert modules (a dense flavor; the spec's expert "
            f"patterns {list(model_spec.expert_modules)} match nothing); choose a mixture-of-experts "
            "flavor with --model.flavor, or use --parallelism.ep 1"
        )
    for num_experts in sorted(set(counts)):
        if num_experts % ep:
            valid = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
            raise ConfigError(
                f"--parallelism.ep {ep} must divide the {num_experts} experts of each MoE layer of {model}: "
                f"valid ep degrees are {', '.join(map(str, valid))} (and they must divide "
                f"dp_shard × cp = {parallel_dims.dp_shard * parallel_dims.cp})"
            )


def _expert_counts(model: nn.Module, model_spec: ModelSpec) -> list[int]:
    """Experts of every expert module of the run's model (built on the meta device)."""
    from plait_ep.sharding import expert_modules, experts_per_module

    return [experts_per_module(module) for _, module in expert_modules(model, model_spec.expert_modules)]


@hookimpl
def plait_apply_expert_parallel(
    model: nn.Module, config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec
) -> None:
    if not parallel_dims.ep_enabled:
        return
    from plait_ep.sharding import expert_modules, shard_experts

    mesh = parallel_dims.get_mesh("ep")
    for _, module in expert_modules(model, model_spec.expert_modules):
        shard_experts(module, mesh)
    if config.compile.enable:
        from plait_ep.exchange import allow_compiled_exchange

        allow_compiled_exchange()


@hookimpl
def plait_token_dispatcher(config: JobConfig, parallel_dims: ParallelDims) -> Any:
    if not parallel_dims.ep_enabled:
        return None
    from plait_ep.dispatcher import AllToAllTokenDispatcher

    return AllToAllTokenDispatcher(parallel_dims.get_mesh("ep").get_group())
