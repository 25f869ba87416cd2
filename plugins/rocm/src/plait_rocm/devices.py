"""AMD Instinct GPUs by architecture (``gcnArchName``) and name: what each can do and its
datasheet dense peaks. torch reports gfx9xx as CUDA compute capability 9.x, so nothing
here (or anywhere in plait) reads the compute capability of an AMD GPU."""
from __future__ import annotations

import dataclasses
import logging

from plait.capabilities import Capabilities, KnownDevice, known_device

logger = logging.getLogger("plait.rocm")

T = 1e12
_OCP_FLOAT8 = ("float8_e4m3fn", "float8_e5m2")
_FNUZ_FLOAT8 = ("float8_e4m3fnuz", "float8_e5m2fnuz")

#: What every device of an architecture can do. DeepEP and torch symmetric memory (async
#: tensor parallelism) are not available on ROCm: those runs are refused with the device named.
ARCHITECTURES: dict[str, Capabilities] = {
    "gfx90a": Capabilities(bf16=True, memory_stats=True, collective_backend="rccl"),
    "gfx942": Capabilities(bf16=True, float8_dtypes=_FNUZ_FLOAT8, grouped_mm=True, memory_stats=True,
                           collective_backend="rccl"),
    "gfx950": Capabilities(bf16=True, float8_dtypes=_OCP_FLOAT8, mx_formats=("mxfp8", "mxfp4"), grouped_mm=True,
                           memory_stats=True, collective_backend="rccl"),
}

#: An architecture not listed above: bf16 and memory statistics only, no peaks.
UNKNOWN_ARCHITECTURE = Capabilities(bf16=True, memory_stats=True, collective_backend="rccl")


def _peaks(float32: float, bfloat16: float, float8: float = 0.0, mxfp8: float = 0.0) -> dict[str, float]:
    peaks = {"float32": float32, "bfloat16": bfloat16, "float8": float8, "mxfp8": mxfp8}
    return {dtype: value for dtype, value in peaks.items() if value}


#: Datasheet dense peaks (no sparsity) of one torch device; "float32" is the FP32 matrix
#: figure. An MI250X or MI250 module holds two GCDs, each a torch device: half the module's
#: figures (ROCm names both "AMD Instinct MI250X/MI250"; the MI250X's are used).
AMD_DEVICES: tuple[KnownDevice, ...] = (
    KnownDevice(name="MI250X", arch="gfx90a", peak_flops=_peaks(47.85 * T, 191.5 * T)),
    KnownDevice(name="MI250", arch="gfx90a", peak_flops=_peaks(45.25 * T, 181 * T)),
    KnownDevice(name="MI210", arch="gfx90a", peak_flops=_peaks(45.3 * T, 181 * T)),
    KnownDevice(name="MI300X", arch="gfx942", peak_flops=_peaks(163.4 * T, 1307.4 * T, 2614.9 * T)),
    KnownDevice(name="MI325X", arch="gfx942", peak_flops=_peaks(163.4 * T, 1307.4 * T, 2614.9 * T)),
    KnownDevice(name="MI300A", arch="gfx942", peak_flops=_peaks(122.6 * T, 980.6 * T, 1961.2 * T)),
    KnownDevice(name="MI350X", arch="gfx950", peak_flops=_peaks(144.2 * T, 2306.9 * T, 4613.7 * T, 4613.7 * T)),
    KnownDevice(name="MI355X", arch="gfx950", peak_flops=_peaks(157.3 * T, 2516.6 * T, 5033.2 * T, 5033.2 * T)),
)


def rocm_capabilities(name: str, gcn_arch_name: str) -> Capabilities:
    """An AMD GPU's capabilities from its architecture (``gfx942`` of ``gfx942:sramecc+:xnack-``)
    with its datasheet peaks when its name is listed; a warning and a conservative answer
    for an architecture or device plait does not know."""
    arch = gcn_arch_name.split(":")[0]
    capabilities = ARCHITECTURES.get(arch)
    if capabilities is None:
        logger.warning(
            "%s has the AMD architecture %r, which the rocm plugin does not know: plait assumes bf16 and memory "
            "statistics only (no float8, MX formats or grouped matmuls) and reports no MFU. docs/hardware.md "
            "says how to add a device", name, arch or "(none reported)",
        )
        return UNKNOWN_ARCHITECTURE
    row = known_device(AMD_DEVICES, name, arch)
    if row is None:
        logger.warning("no datasheet peak FLOPs for %r (%s): MFU is not reported; set PLAIT_PEAK_FLOPS to the "
                       "device's dense peak to report it", name, arch)
        return capabilities
    return dataclasses.replace(capabilities, peak_flops=dict(row.peak_flops))
