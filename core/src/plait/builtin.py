"""The core's own behaviour, registered as a plugin at start (like any other), so the
core uses the same hooks as everybody else and wrappers see it."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

from plait.capabilities import CPU_CAPABILITIES, Capabilities, nvidia_capabilities, training_peak_flops
from plait.hookspecs import hookimpl

logger = logging.getLogger("plait")

PLAIT_API_VERSION = 1
PROVIDES = ("device:cpu", "device:cuda")
REQUIRES = ()

#: fp32 FLOPs per cycle per core by vector extension (two FMA units).
_CPU_FLOPS_PER_CYCLE = (("avx512f", 64), ("avx2", 32), ("sse2", 8))


def cpu_peak_per_thread() -> float:
    """Nominal fp32 peak of one core from /proc/cpuinfo (vector width × clock); 64 GFLOP/s
    where that cannot be read. A datasheet figure: measured GEMM throughput is lower."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return 64e9
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "").split()
    mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
    per_cycle = next((n for flag, n in _CPU_FLOPS_PER_CYCLE if flag in flags), 8)
    return per_cycle * (max(mhz) * 1e6 if mhz else 2e9)


def cpu_capabilities() -> Capabilities:
    """A CPU's capabilities, with the nominal peak of the threads torch uses (the same for
    float32 and bfloat16: a datasheet-style figure, not a measured one)."""
    import torch

    peak = cpu_peak_per_thread() * torch.get_num_threads()
    return dataclasses.replace(CPU_CAPABILITIES, peak_flops={"float32": peak, "bfloat16": peak})


def cuda_capabilities() -> Capabilities:
    """The capabilities of the current CUDA device: an NVIDIA GPU by compute capability and
    name; an AMD GPU (ROCm build of torch) only conservatively, since the rocm plugin
    answers for those."""
    import torch

    name = torch.cuda.get_device_name()
    if torch.version.hip:
        logger.warning(
            "%s is an AMD GPU: enable the rocm plugin (--plugins rocm, package plait-rocm) for its capabilities "
            "and peak FLOPs; without it plait assumes bf16 and memory statistics only", name
        )
        return Capabilities(bf16=True, memory_stats=True, collective_backend="rccl")
    return nvidia_capabilities(name, torch.cuda.get_device_capability())


class CorePlugin:
    """The core's hook implementations; the plugin manager registers one, as
    ``plait.builtin``, before any other plugin."""

    def __init__(self, hook: Any) -> None:
        self.hook = hook

    @hookimpl(trylast=True)
    def plait_device(self, config: Any):
        import torch

        from plait.train_state import DeviceInfo

        dtype = config.training.dtype
        if torch.cuda.is_available():
            capabilities = cuda_capabilities()
            return DeviceInfo(type="cuda", backend="nccl", peak_flops=training_peak_flops(capabilities, dtype),
                              name=torch.cuda.get_device_name(), capabilities=capabilities)
        capabilities = cpu_capabilities()
        return DeviceInfo(type="cpu", backend="gloo", peak_flops=training_peak_flops(capabilities, dtype), name="cpu",
                          capabilities=capabilities)

    @hookimpl
    def plait_train_context(self, config: Any, parallel_dims: Any, ctx: Any):
        """bf16 compute through autocast, unless a plugin applies the compute dtype itself
        (``RunNeeds.applies_compute_dtype``, e.g. FSDP's parameter dtype); the weights'
        bf16 casts are not kept for the backward (``plait.autocast``)."""
        if config.training.dtype != "bfloat16" or ctx.needs.applies_compute_dtype:
            return None
        import torch

        from plait.autocast import autocast_recasting_weights

        device_type = ctx.inputs.device.type if ctx.inputs is not None else "cpu"
        return autocast_recasting_weights(device_type, torch.bfloat16)

    @hookimpl(trylast=True)
    def plait_train_step(self, ctx: Any) -> Any:
        from plait.step import refuse_plain_implementations, run_train_step

        refuse_plain_implementations(self.hook.plait_train_step)
        return run_train_step(ctx)

    @hookimpl
    def plait_after_optimizer_step(self, ctx: Any) -> None:
        """Mixture-of-experts bookkeeping: expert-bias update and routing-balance metrics."""
        from plait.nn.moe import finish_moe_step

        dp_mesh = ctx.parallel_dims.get_optional_mesh("dp_cp")
        moe = finish_moe_step(
            ctx.model_parts,
            bias_update_rate=ctx.config.moe.load_balance_coeff,
            group=dp_mesh.get_group() if dp_mesh is not None else None,
        )
        if moe is not None:
            ctx.results.setdefault("metrics", {}).update(moe.summary)
            ctx.results.setdefault("metric_details", {}).update(moe.per_layer)

    @hookimpl(trylast=True)
    def plait_checkpoint_save(self, checkpointer: Any, step: int, force: bool) -> bool:
        from plait.step import refuse_plain_implementations

        refuse_plain_implementations(self.hook.plait_checkpoint_save)
        return checkpointer.save(step, force=force)
