"""Wrapping a model chunk for data parallelism, chosen from the parallel degrees:

- dp_shard × cp > 1: FSDP2 over the ``dp_shard_cp`` mesh (each block, then the root);
  with dp_replicate > 1 as well, HSDP over the 2-D ``(dp_replicate, dp_shard_cp)`` mesh;
  under expert parallelism the experts' slices are sharded over ``efsdp`` instead
  (with ``dp_replicate``: HSDP over ``(dp_replicate, efsdp)``);
- dp_replicate > 1 alone: DDP-style replication (FSDP2-based ``replicate``) over the
  ``dp_replicate`` mesh, block by block so gradients are all-reduced while backward runs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

if TYPE_CHECKING:
    from plait.config import JobConfig
    from plait.model_spec import ModelSpec
    from plait.parallel_dims import ParallelDims

    from plait_fsdp.config import FSDPConfig


def mixed_precision_policy(config: JobConfig) -> MixedPrecisionPolicy:
    """bf16 parameters in compute when --training.dtype is bfloat16; fp32 master weights."""
    section: FSDPConfig = config.fsdp
    param_dtype = torch.bfloat16 if config.training.dtype == "bfloat16" else None
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=getattr(torch, section.reduce_dtype))


def reshard_after_forward(section: FSDPConfig, pipeline_parallel: bool) -> bool | None:
    """None lets FSDP decide (blocks reshard, the root does not). Under pipeline
    parallelism a chunk runs forward for many micro-batches, so keeping its parameters
    gathered avoids one all-gather per micro-batch."""
    if section.reshard_after_forward == "always":
        return True
    if section.reshard_after_forward == "never":
        return False
    return False if pipeline_parallel else None


def blocks_of(model: nn.Module, model_spec: ModelSpec) -> list[nn.Module]:
    container = getattr(model, model_spec.block_container, None)
    if container is None:  # a pipeline stage may hold no blocks
        return []
    if isinstance(container, nn.ModuleDict):
        return list(container.values())
    return list(container)


def apply_fsdp(model: nn.Module, config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec) -> None:
    if parallel_dims.dp_replicate_enabled:
        mesh = parallel_dims.get_mesh(("dp_replicate", "dp_shard_cp"))
    else:
        mesh = parallel_dims.get_mesh("dp_shard_cp")
    section: FSDPConfig = config.fsdp
    offload: OffloadPolicy = CPUOffloadPolicy(pin_memory=torch.accelerator.is_available()) if section.cpu_offload else OffloadPolicy()
    options: dict[str, Any] = dict(
        mesh=mesh,
        mp_policy=mixed_precision_policy(config),
        offload_policy=offload,
        reshard_after_forward=reshard_after_forward(section, parallel_dims.pp_enabled),
    )
    if parallel_dims.ep_enabled:
        shard_expert_slices(model, parallel_dims, options)
    for block in blocks_of(model, model_spec):
        fully_shard(block, **options)
    fully_shard(model, **options)


def expert_parallel_modules(model: nn.Module, parallel_dims: ParallelDims) -> list[nn.Module]:
    """Modules whose own parameters expert parallelism placed on the ``ep`` mesh."""
    from torch.distributed.tensor import DTensor

    ep_mesh = parallel_dims.get_mesh("ep")
    return [
        module
        for module in model.modules()
        if any(isinstance(p, DTensor) and p.device_mesh == ep_mesh for p in module.parameters(recurse=False))
    ]


def shard_expert_slices(model: nn.Module, parallel_dims: ParallelDims, options: dict[str, Any]) -> None:
    """FSDP over ``efsdp`` (the ranks that hold the same experts) for each expert module.

    An expert's gradient on one rank already sums the tokens of the whole ep group (the
    all-to-all brought them there), so the reduction divides by every data-parallel rank
    (``dp_replicate × dp_shard × cp``), not by the ``efsdp`` ranks alone: the mean over
    all tokens, as for the other parameters."""
    if parallel_dims.dp_replicate_enabled:
        mesh = parallel_dims.get_mesh(("dp_replicate", "efsdp"))
    else:
        mesh = parallel_dims.get_mesh("efsdp")
    data_parallel_ranks = parallel_dims.dp_replicate * parallel_dims.dp_shard * parallel_dims.cp
    for module in expert_parallel_modules(model, parallel_dims):
        fully_shard(module, **{**options, "mesh": mesh})
        module.set_gradient_divide_factor(float(data_parallel_ranks))
        if parallel_dims.efsdp > 1:
            # Sum, then divide the reduced shard: a custom factor otherwise reduce-scatters with
            # PREMUL_SUM, which gloo lacks. (Not on one efsdp rank: torch 2.13 would divide twice.)
            module.set_force_sum_reduction_for_comms(True)


def apply_replicate(model: nn.Module, config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec) -> None:
    # bf16 compute comes from the core's autocast here (it stays off only under sharding),
    # so parameters keep their dtype; only the reduction dtype is set.
    from torch.distributed._composable.replicate_with_fsdp import replicate

    section: FSDPConfig = config.fsdp
    mp_policy = MixedPrecisionPolicy(reduce_dtype=getattr(torch, section.reduce_dtype))
    mesh = parallel_dims.get_mesh("dp_replicate")
    for block in blocks_of(model, model_spec):
        replicate(block, mesh=mesh, mp_policy=mp_policy)
    replicate(model, mesh=mesh, mp_policy=mp_policy)


def apply_data_parallel(model: nn.Module, config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec) -> None:
    if parallel_dims.fsdp_enabled:
        apply_fsdp(model, config, parallel_dims, model_spec)
    elif parallel_dims.dp_replicate_enabled:
        apply_replicate(model, config, parallel_dims, model_spec)


def set_gradient_sync(model_parts: list[nn.Module], enabled: bool) -> None:
    """Reduce gradients in this backward (True) or accumulate them locally (False)."""
    for part in model_parts:
        if isinstance(part, FSDPModule):
            part.set_requires_gradient_sync(enabled)
