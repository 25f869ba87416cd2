"""Plugin module: answers ``plait_device`` on AMD GPUs (ROCm builds of torch). Light at
import; torch is imported when the device is resolved."""
from __future__ import annotations

from typing import TYPE_CHECKING

from plait import hookimpl

if TYPE_CHECKING:
    from plait.config import JobConfig
    from plait.train_state import DeviceInfo

PLAIT_API_VERSION = 1
PROVIDES = ("device:rocm",)
REQUIRES = ()
DESCRIPTION = "rocm: AMD Instinct GPUs (ROCm torch): capabilities by gcnArchName, datasheet peaks, RCCL"


@hookimpl
def plait_device(config: JobConfig) -> DeviceInfo | None:
    """An AMD GPU's answer; None elsewhere, where the core answers. torch drives AMD GPUs
    through its "cuda" device type and its "nccl" backend name (RCCL underneath)."""
    import torch

    if not (torch.version.hip and torch.cuda.is_available()):
        return None
    from plait.capabilities import training_peak_flops
    from plait.train_state import DeviceInfo

    from plait_rocm.devices import rocm_capabilities

    name = torch.cuda.get_device_name()
    capabilities = rocm_capabilities(name, getattr(torch.cuda.get_device_properties(), "gcnArchName", ""))
    return DeviceInfo(type="cuda", backend="nccl", peak_flops=training_peak_flops(capabilities, config.training.dtype),
                      name=name, capabilities=capabilities)
