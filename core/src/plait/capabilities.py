"""What a device can do, asked by name instead of by vendor, version or compute capability.

The device answer (hook ``plait_device``) carries a ``Capabilities`` record. Every feature
gate in plait asks it (``device.capabilities.has("float8_matmul")``), and a plugin that
needs a capability declares it in ``RunNeeds.requires``: the core refuses the run up front,
naming the plugin, the device and what it lacks. The core answers for CPUs and NVIDIA GPUs
(``NVIDIA_DEVICES``); a vendor plugin (rocm) answers for its hardware.

Tests simulate devices without the hardware: ``simulated_hardware("H100")`` patches what
torch reports, ``simulated_device("MI300X")`` is the ``DeviceInfo`` the installed device
plugins answer for it.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from plait.errors import ConfigError

if TYPE_CHECKING:
    from plait.train_state import DeviceInfo

logger = logging.getLogger("plait")

#: The names ``Capabilities.has`` and ``RunNeeds.requires`` accept.
CAPABILITY_NAMES: tuple[str, ...] = (
    "bf16",
    "float8_matmul",
    "mxfp8",
    "mxfp4",
    "nvfp4",
    "symmetric_memory",
    "deepep",
    "grouped_mm",
    "flex_attention_compiled_deterministic",
    "memory_stats",
)

#: The compute dtype names ``Capabilities.peak_flops`` is keyed by.
PEAK_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float8", "mxfp8")


@dataclass(frozen=True, kw_only=True)
class Capabilities:
    """What one device can do. The defaults describe a device that can do nothing special."""

    bf16: bool = False
    """bfloat16 compute (autocast, FSDP parameter dtype)."""
    float8_dtypes: tuple[str, ...] = ()
    """torch dtype names of the float8 pair the device's scaled matmul takes, forward type
    first: ("float8_e4m3fn", "float8_e5m2") on NVIDIA SM 8.9+ and AMD gfx950,
    ("float8_e4m3fnuz", "float8_e5m2fnuz") on AMD gfx942; empty: no float8 matmul."""
    mx_formats: tuple[str, ...] = ()
    """Block-scaled formats with hardware kernels: "mxfp8", "mxfp4", "nvfp4"."""
    symmetric_memory: bool = False
    """torch symmetric memory, which async tensor parallelism needs."""
    deepep: bool = False
    """DeepEP's kernels run here (NVIDIA SM 9.0+)."""
    grouped_mm: bool = False
    """``torch._grouped_mm`` runs forward and backward (MoE experts)."""
    flex_attention_compiled_deterministic: bool = False
    """Compiled FlexAttention forward and backward give the same bits run to run."""
    memory_stats: bool = False
    """The caching allocator reports device memory (CUDA and HIP builds of torch)."""
    peak_flops: Mapping[str, float] = field(default_factory=dict, hash=False)
    """Dense FLOP/s of one device by compute dtype name ("float32", "bfloat16", "float8",
    "mxfp8"); an absent key: unknown."""
    collective_backend: str = "gloo"
    """For reporting: "gloo", "nccl", or "rccl" on ROCm (torch's process-group backend name
    stays in ``DeviceInfo.backend``, "nccl" on ROCm too)."""

    @property
    def float8_matmul(self) -> bool:
        return bool(self.float8_dtypes)

    def has(self, name: str) -> bool:
        """Whether the device has the capability ``name`` (one of ``CAPABILITY_NAMES``)."""
        if name not in CAPABILITY_NAMES:
            raise ValueError(f"unknown capability {name!r}; known capabilities: {', '.join(CAPABILITY_NAMES)}")
        if name in ("mxfp8", "mxfp4", "nvfp4"):
            return name in self.mx_formats
        return bool(getattr(self, name))

    def missing(self, names: tuple[str, ...] | list[str]) -> list[str]:
        """The capabilities among ``names`` the device lacks, in the order given."""
        return [name for name in names if not self.has(name)]

    def summary(self) -> dict[str, Any]:
        """Every capability by name, plus the float8 pair, the peaks and the backend (for ``plait plan``)."""
        return {
            **{name: self.has(name) for name in CAPABILITY_NAMES},
            "float8_dtypes": list(self.float8_dtypes),
            "peak_flops": dict(self.peak_flops),
            "collective_backend": self.collective_backend,
        }


#: What a CPU has: bf16 compute and grouped matmuls (torch's CPU kernels); peaks are
#: added from /proc/cpuinfo by the core's device answer.
CPU_CAPABILITIES = Capabilities(bf16=True, grouped_mm=True)


def training_peak_flops(capabilities: Capabilities, dtype: str) -> float:
    """One device's dense peak FLOP/s for a run in ``dtype`` (``DeviceInfo.peak_flops``, for
    MFU): the environment variable PLAIT_PEAK_FLOPS where set, else the capabilities'
    figure, 0 when unknown (MFU is then not reported)."""
    override = os.environ.get("PLAIT_PEAK_FLOPS")
    if override:
        try:
            peak = float(override)
        except ValueError:
            peak = -1.0
        if not 0 < peak < math.inf:
            raise ConfigError(f"the environment variable PLAIT_PEAK_FLOPS must be a device's peak FLOP/s, a positive "
                              f"number such as 989e12, got {override!r}: fix or unset it")
        return peak
    return float(capabilities.peak_flops.get(dtype, 0.0))


def describe_device(device: DeviceInfo) -> str:
    """The device in words for messages: its type and name."""
    return f"{device.type} device {device.name!r}" if device.name and device.name != device.type else device.type


def check_requirements(device: DeviceInfo, requirements: list[tuple[str, tuple[str, ...], str]]) -> None:
    """Refuse a run whose plugins need capabilities the device lacks: one ConfigError
    naming each plugin, the device and each missing capability. ``requirements`` holds
    (plugin name, required capability names, how to run without them)."""
    problems = []
    for plugin, requires, fix in requirements:
        for name in requires:
            if name not in CAPABILITY_NAMES:
                raise ConfigError(
                    f"plugin {plugin!r} requires an unknown capability {name!r} (RunNeeds.requires); "
                    f"known capabilities: {', '.join(CAPABILITY_NAMES)}"
                )
        missing = device.capabilities.missing(requires)
        if missing:
            problems.append(f"plugin {plugin!r} needs {', '.join(missing)}" + (f" ({fix})" if fix else ""))
    if problems:
        raise ConfigError(
            f"this run needs capabilities that the {describe_device(device)} lacks: {'; '.join(problems)}. "
            "Run on a device that has them (docs/hardware.md lists each device's capabilities)"
        )


# --------------------------------------------------------------------------- NVIDIA


@dataclass(frozen=True, kw_only=True)
class KnownDevice:
    """A row of a device table: devices whose name contains ``name`` and whose compute
    capability (or AMD gcnArchName) is ``arch``, with their datasheet dense peaks."""

    name: str
    arch: Any
    peak_flops: Mapping[str, float]


def _peaks(float32: float, bfloat16: float, float8: float = 0.0, mxfp8: float = 0.0) -> dict[str, float]:
    peaks = {"float32": float32, "bfloat16": bfloat16, "float8": float8, "mxfp8": mxfp8}
    return {dtype: value for dtype, value in peaks.items() if value}


T = 1e12
#: NVIDIA datasheet dense peaks (no sparsity) of one GPU; "float32" is the TF32 tensor-core
#: figure. First match wins, so a longer name comes before the name it contains.
NVIDIA_DEVICES: tuple[KnownDevice, ...] = (
    KnownDevice(name="A100", arch=(8, 0), peak_flops=_peaks(156 * T, 312 * T)),
    KnownDevice(name="A10G", arch=(8, 6), peak_flops=_peaks(62.5 * T, 125 * T)),
    KnownDevice(name="L40S", arch=(8, 9), peak_flops=_peaks(183 * T, 362 * T, 733 * T)),
    KnownDevice(name="L4", arch=(8, 9), peak_flops=_peaks(60 * T, 121 * T, 242.5 * T)),
    KnownDevice(name="H100 PCIe", arch=(9, 0), peak_flops=_peaks(378 * T, 756 * T, 1513 * T)),
    KnownDevice(name="H100 NVL", arch=(9, 0), peak_flops=_peaks(417.5 * T, 835.5 * T, 1670.5 * T)),
    KnownDevice(name="H100", arch=(9, 0), peak_flops=_peaks(494.7 * T, 989.4 * T, 1978.9 * T)),
    KnownDevice(name="H200 NVL", arch=(9, 0), peak_flops=_peaks(417.5 * T, 835.5 * T, 1670.5 * T)),
    KnownDevice(name="H200", arch=(9, 0), peak_flops=_peaks(494.7 * T, 989.4 * T, 1978.9 * T)),
    KnownDevice(name="H800", arch=(9, 0), peak_flops=_peaks(494.7 * T, 989.4 * T, 1978.9 * T)),
    KnownDevice(name="GB200", arch=(10, 0), peak_flops=_peaks(1250 * T, 2500 * T, 5000 * T, 5000 * T)),
    KnownDevice(name="B200", arch=(10, 0), peak_flops=_peaks(1100 * T, 2250 * T, 4500 * T, 4500 * T)),
)


def known_device(table: tuple[KnownDevice, ...], name: str, arch: Any) -> KnownDevice | None:
    """The first row of ``table`` whose name is in ``name`` and whose arch is ``arch``."""
    return next((row for row in table if row.name in name and row.arch == arch), None)


def nvidia_capabilities(name: str, compute_capability: tuple[int, int]) -> Capabilities:
    """An NVIDIA GPU's capabilities from its compute capability, with the datasheet peaks
    of ``NVIDIA_DEVICES`` when its name is listed (a warning and no peaks otherwise)."""
    cc = tuple(compute_capability)
    row = known_device(NVIDIA_DEVICES, name, cc)
    if row is None:
        logger.warning("no datasheet peak FLOPs for %r (compute capability %d.%d): MFU is not reported; "
                       "set PLAIT_PEAK_FLOPS to the device's dense peak to report it", name, *cc)
    return Capabilities(
        bf16=cc >= (8, 0),
        float8_dtypes=("float8_e4m3fn", "float8_e5m2") if cc >= (8, 9) else (),
        mx_formats=("mxfp8", "mxfp4", "nvfp4") if cc[0] == 10 else (),
        symmetric_memory=cc >= (9, 0),
        deepep=cc >= (9, 0),
        grouped_mm=cc >= (8, 0),
        flex_attention_compiled_deterministic=cc >= (8, 0),
        memory_stats=True,
        peak_flops=dict(row.peak_flops) if row else {},
        collective_backend="nccl",
    )


# --------------------------------------------------------------------------- simulated devices (tests)


@dataclass(frozen=True, kw_only=True)
class SimulatedHardware:
    """What torch reports on a device: its name, compute capability and, on ROCm, the
    gcnArchName (torch reports gfx9xx as compute capability 9.x there)."""

    device_name: str
    compute_capability: tuple[int, int]
    gcn_arch: str | None = None


SIMULATED_HARDWARE: dict[str, SimulatedHardware] = {
    "A100": SimulatedHardware(device_name="NVIDIA A100-SXM4-80GB", compute_capability=(8, 0)),
    "A10G": SimulatedHardware(device_name="NVIDIA A10G", compute_capability=(8, 6)),
    "L4": SimulatedHardware(device_name="NVIDIA L4", compute_capability=(8, 9)),
    "L40S": SimulatedHardware(device_name="NVIDIA L40S", compute_capability=(8, 9)),
    "H100": SimulatedHardware(device_name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0)),
    "H100 PCIe": SimulatedHardware(device_name="NVIDIA H100 PCIe", compute_capability=(9, 0)),
    "H200": SimulatedHardware(device_name="NVIDIA H200", compute_capability=(9, 0)),
    "H800": SimulatedHardware(device_name="NVIDIA H800", compute_capability=(9, 0)),
    "B200": SimulatedHardware(device_name="NVIDIA B200", compute_capability=(10, 0)),
    "GB200": SimulatedHardware(device_name="NVIDIA GB200", compute_capability=(10, 0)),
    "MI250X": SimulatedHardware(device_name="AMD Instinct MI250X/MI250", compute_capability=(9, 0),
                                gcn_arch="gfx90a:sramecc+:xnack-"),
    "MI300X": SimulatedHardware(device_name="AMD Instinct MI300X", compute_capability=(9, 4),
                                gcn_arch="gfx942:sramecc+:xnack-"),
    "MI325X": SimulatedHardware(device_name="AMD Instinct MI325X", compute_capability=(9, 4),
                                gcn_arch="gfx942:sramecc+:xnack-"),
    "MI350X": SimulatedHardware(device_name="AMD Instinct MI350X", compute_capability=(9, 5),
                                gcn_arch="gfx950:sramecc+:xnack-"),
    "MI355X": SimulatedHardware(device_name="AMD Instinct MI355X", compute_capability=(9, 5),
                                gcn_arch="gfx950:sramecc+:xnack-"),
}


CPU_HARDWARE = SimulatedHardware(device_name="cpu", compute_capability=(0, 0))


@contextlib.contextmanager
def simulated_hardware(name: str) -> Iterator[SimulatedHardware | None]:
    """Within the block, torch reports the device ``name`` (a key of ``SIMULATED_HARDWARE``,
    or "cpu" for no GPU): ``torch.cuda.is_available``, ``get_device_name``,
    ``get_device_capability``, ``get_device_properties(...).gcnArchName`` and
    ``torch.version.hip``. Only what the device answers read; no kernel runs."""
    from types import SimpleNamespace
    from unittest import mock

    import torch

    if name != "cpu" and name not in SIMULATED_HARDWARE:
        raise ValueError(f"no simulated device {name!r}; known: cpu, {', '.join(SIMULATED_HARDWARE)}")
    hardware = SIMULATED_HARDWARE.get(name)
    with contextlib.ExitStack() as stack:
        patch = stack.enter_context
        patch(mock.patch.object(torch.cuda, "is_available", lambda: hardware is not None))
        hip_version = "7.0.0" if hardware is not None and hardware.gcn_arch else None
        patch(mock.patch.object(torch.version, "hip", hip_version))
        if hardware is not None:
            properties = SimpleNamespace(name=hardware.device_name, major=hardware.compute_capability[0],
                                         minor=hardware.compute_capability[1], gcnArchName=hardware.gcn_arch or "")
            patch(mock.patch.object(torch.cuda, "get_device_name", lambda device=None: hardware.device_name))
            patch(mock.patch.object(torch.cuda, "get_device_capability",
                                    lambda device=None: hardware.compute_capability))  # fmt: skip
            patch(mock.patch.object(torch.cuda, "get_device_properties", lambda device=None: properties))
        yield hardware


def simulated_device(name: str, *, dtype: str = "bfloat16") -> DeviceInfo:
    """The ``DeviceInfo`` that ``plait train`` would resolve on the device ``name`` (see
    ``simulated_hardware``) for a run in ``dtype``, with every installed device plugin
    enabled (an AMD device needs plait-rocm installed). For tests of accept/refuse
    decisions: ``check_plugins(..., device=simulated_device("H100"))``."""
    from plait.config import JobConfig
    from plait.plugins import PluginManager

    manager = PluginManager()
    device_plugins = [plugin for plugin, module in manager._light_modules()
                      if any(p.startswith("device:") for p in getattr(module, "PROVIDES", ()))]
    if SIMULATED_HARDWARE.get(name, CPU_HARDWARE).gcn_arch and "rocm" not in device_plugins:
        raise ModuleNotFoundError(f"simulated_device({name!r}) is an AMD GPU, which the rocm plugin answers "
                                  "for: install plait-rocm (pip install -e ./plugins/rocm)")
    manager.enable(device_plugins)
    config = JobConfig()
    config.training.dtype = dtype
    with simulated_hardware(name):
        return manager.hook.plait_device(config=config)
