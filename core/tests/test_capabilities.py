"""Device capabilities: the record, the core's answers for CPUs and simulated NVIDIA GPUs,
and the up-front refusal of a plugin whose declared needs the device lacks."""
from __future__ import annotations

import logging
import re

import pytest
import torch

from plait import hookimpl
from plait.builtin import CorePlugin, cpu_peak_per_thread
from plait.capabilities import (
    CAPABILITY_NAMES,
    NVIDIA_DEVICES,
    SIMULATED_HARDWARE,
    Capabilities,
    simulated_device,
    simulated_hardware,
)
from plait.config import JobConfig
from plait.errors import ConfigError
from plait.train_state import DeviceInfo, RunNeeds

from toy_model import ToyModelPlugin, manager_with, toy_config
from plait.job import resolve_job

T = 1e12
#: Datasheet dense peaks (bf16, float8) and what each simulated NVIDIA GPU must answer.
NVIDIA_EXPECTED = {
    "A100": (312 * T, None, ()),
    "A10G": (125 * T, None, ()),
    "L4": (121 * T, 242.5 * T, ()),
    "L40S": (362 * T, 733 * T, ()),
    "H100": (989.4 * T, 1978.9 * T, ()),
    "H100 PCIe": (756 * T, 1513 * T, ()),
    "H200": (989.4 * T, 1978.9 * T, ()),
    "H800": (989.4 * T, 1978.9 * T, ()),
    "B200": (2250 * T, 4500 * T, ("mxfp8", "mxfp4", "nvfp4")),
    "GB200": (2500 * T, 5000 * T, ("mxfp8", "mxfp4", "nvfp4")),
}


def test_has_answers_every_known_name_and_refuses_others():
    capabilities = Capabilities(bf16=True, float8_dtypes=("float8_e4m3fn", "float8_e5m2"), mx_formats=("mxfp8",))
    assert capabilities.float8_matmul and not Capabilities().float8_matmul
    assert [name for name in CAPABILITY_NAMES if capabilities.has(name)] == ["bf16", "float8_matmul", "mxfp8"]
    assert capabilities.missing(["mxfp4", "bf16", "deepep"]) == ["mxfp4", "deepep"]
    with pytest.raises(ValueError, match="unknown capability 'fp8'; known capabilities: bf16, float8_matmul, mxfp8"):
        capabilities.has("fp8")


def test_the_cpu_answer_is_unchanged():
    device = simulated_device("cpu", dtype="float32")
    assert (device.type, device.backend, device.name) == ("cpu", "gloo", "cpu")
    assert device.peak_flops == pytest.approx(cpu_peak_per_thread() * torch.get_num_threads())
    caps = device.capabilities
    assert caps.bf16 and caps.grouped_mm and caps.collective_backend == "gloo"
    assert not (caps.float8_matmul or caps.mx_formats or caps.symmetric_memory or caps.deepep or caps.memory_stats)
    assert DeviceInfo(type="cpu", backend="gloo", peak_flops=0).capabilities.has("bf16")  # the default: a CPU


@pytest.mark.parametrize("name", list(NVIDIA_EXPECTED))
def test_each_nvidia_gpu_by_compute_capability_and_name(name):
    bf16_peak, float8_peak, mx = NVIDIA_EXPECTED[name]
    device = simulated_device(name)
    caps = device.capabilities
    assert (device.type, device.backend, caps.collective_backend) == ("cuda", "nccl", "nccl")
    assert device.name == SIMULATED_HARDWARE[name].device_name
    assert device.peak_flops == caps.peak_flops["bfloat16"] == pytest.approx(bf16_peak)
    assert caps.peak_flops["float32"] == pytest.approx(bf16_peak / 2, rel=0.03)  # TF32 dense, about half
    assert caps.peak_flops.get("float8") == (pytest.approx(float8_peak) if float8_peak else None)
    assert caps.float8_dtypes == (("float8_e4m3fn", "float8_e5m2") if float8_peak else ())
    assert caps.mx_formats == mx and ("mxfp8" in caps.peak_flops) == bool(mx)
    hopper_or_later = SIMULATED_HARDWARE[name].compute_capability >= (9, 0)
    assert caps.symmetric_memory == caps.deepep == hopper_or_later
    assert caps.bf16 and caps.grouped_mm and caps.memory_stats
    assert simulated_device(name, dtype="float32").peak_flops == caps.peak_flops["float32"]


def test_every_nvidia_table_row_is_reachable():
    """A longer name must come before a name it contains (first match wins)."""
    for index, row in enumerate(NVIDIA_DEVICES):
        earlier = [other.name for other in NVIDIA_DEVICES[:index] if other.name in row.name and other.arch == row.arch]
        assert not earlier, (row.name, earlier)


def test_unknown_nvidia_gpu_has_capabilities_by_compute_capability_and_no_peak(caplog, monkeypatch):
    config = JobConfig()
    with simulated_hardware("H100"):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Future GPU")
        with caplog.at_level(logging.WARNING, logger="plait"):
            device = CorePlugin(None).plait_device(config=config)
    assert device.peak_flops == 0 and not device.capabilities.peak_flops and device.capabilities.float8_matmul
    assert "no datasheet peak FLOPs for 'NVIDIA Future GPU' (compute capability 9.0)" in caplog.text
    monkeypatch.setenv("PLAIT_PEAK_FLOPS", "1e15")
    with simulated_hardware("H100"):
        assert CorePlugin(None).plait_device(config=config).peak_flops == 1e15


def test_an_amd_gpu_without_the_rocm_plugin_is_answered_conservatively(caplog):
    """torch reports gfx90a as compute capability 9.0: no CUDA-style test may read it as Hopper."""
    with simulated_hardware("MI250X"), caplog.at_level(logging.WARNING, logger="plait"):
        device = CorePlugin(None).plait_device(config=JobConfig())
    caps = device.capabilities
    assert (device.backend, caps.collective_backend) == ("nccl", "rccl")
    assert caps.bf16 and caps.memory_stats and device.peak_flops == 0
    assert not (caps.float8_matmul or caps.symmetric_memory or caps.deepep or caps.grouped_mm)
    assert "enable the rocm plugin (--plugins rocm" in caplog.text


class NeedsPlugin:
    PLAIT_API_VERSION = 1
    PROVIDES = ()
    REQUIRES = ()

    def __init__(self, needs: RunNeeds) -> None:
        self.needs = needs

    @hookimpl
    def plait_run_needs(self, config, parallel_dims, model_spec):
        return self.needs


def _resolve(tmp_path, device, *plugins):
    manager = manager_with(ToyModelPlugin(), *plugins)
    return resolve_job(toy_config(tmp_path), manager, manager.model_spec("hooktoy"), world_size=1, device=device)


def test_a_plugin_needing_a_capability_is_refused_up_front_naming_plugin_device_and_capability(tmp_path):
    float8 = NeedsPlugin(RunNeeds(requires=("float8_matmul", "bf16"), requires_fix="or use --float8.emulate"))
    job = _resolve(tmp_path, simulated_device("H100"), float8)
    assert job.device.name == "NVIDIA H100 80GB HBM3" and job.device.capabilities.float8_matmul
    with pytest.raises(ConfigError) as refused:
        _resolve(tmp_path, simulated_device("A100"), float8)
    assert str(refused.value) == (
        "this run needs capabilities that the cuda device 'NVIDIA A100-SXM4-80GB' lacks: plugin 'throwaway1' "
        "needs float8_matmul (or use --float8.emulate). Run on a device that has them (docs/hardware.md lists "
        "each device's capabilities)"
    )
    with pytest.raises(ConfigError, match=re.escape("the cpu lacks: plugin 'throwaway1' needs float8_matmul (or use "
                                                    "--float8.emulate); plugin 'throwaway2' needs deepep.")):
        _resolve(tmp_path, simulated_device("cpu"), float8, NeedsPlugin(RunNeeds(requires=("deepep",))))
    with pytest.raises(ConfigError, match="plugin 'throwaway1' requires an unknown capability 'fp8'"):
        _resolve(tmp_path, simulated_device("H100"), NeedsPlugin(RunNeeds(requires=("fp8",))))


def test_the_job_resolves_this_machines_device_once(tmp_path):
    job = _resolve(tmp_path, None)
    assert job.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert job.device.capabilities.summary()["collective_backend"] == job.device.capabilities.collective_backend


def test_simulated_device_names_what_it_knows():
    with pytest.raises(ValueError, match="no simulated device 'X1'; known: cpu, A100"):
        simulated_device("X1")
