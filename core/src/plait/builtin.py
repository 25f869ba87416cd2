"""The core's own behaviour, registered as a plugin at start (like any other), so the
core uses the same hooks as everybody else and wrappers see it."""
from __future__ import annotations

import os
from typing import Any

from plait import hookimpl

PLAIT_API_VERSION = 1
PROVIDES = ("device:cpu", "device:cuda")
REQUIRES = ()

#: Dense bf16 peak FLOP/s by device-name fragment (datasheet figures, no sparsity).
_CUDA_PEAK_BF16 = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H800": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
}

#: Nominal CPU peak per thread (fp32 AVX-512 FMA at ~2 GHz); override with PLAIT_PEAK_FLOPS.
_CPU_PEAK_PER_THREAD = 64e9


def peak_flops(device_type: str, device_name: str, dtype: str) -> float:
    override = os.environ.get("PLAIT_PEAK_FLOPS")
    if override:
        return float(override)
    if device_type == "cuda":
        for fragment, flops in _CUDA_PEAK_BF16.items():
            if fragment in device_name:
                return flops if dtype == "bfloat16" else flops / 2
        return 312e12
    import torch

    return _CPU_PEAK_PER_THREAD * torch.get_num_threads()


@hookimpl(trylast=True)
def plait_device(config: Any):
    import torch

    from plait.train_state import DeviceInfo

    dtype = config.training.dtype
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return DeviceInfo(type="cuda", backend="nccl", peak_flops=peak_flops("cuda", name, dtype), name=name)
    return DeviceInfo(type="cpu", backend="gloo", peak_flops=peak_flops("cpu", "cpu", dtype), name="cpu")


@hookimpl
def plait_train_context(config: Any, parallel_dims: Any, ctx: Any):
    """bf16 compute through autocast, unless FSDP applies its own mixed precision."""
    if config.training.dtype != "bfloat16" or parallel_dims.fsdp_enabled:
        return None
    import torch

    device_type = ctx.inputs.device.type if ctx.inputs is not None else "cpu"
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


@hookimpl
def plait_train_step(ctx: Any) -> None:
    from plait.train import run_train_step

    run_train_step(ctx)

