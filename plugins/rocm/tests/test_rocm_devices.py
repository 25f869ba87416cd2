"""The rocm plugin's device answer on simulated AMD GPUs (monkeypatched torch.version.hip,
device names and gcnArchName), and what the other plugins decide on them."""
from __future__ import annotations

import logging

import pytest
import torch

from plait.capabilities import SIMULATED_HARDWARE, simulated_device, simulated_hardware
from plait.config import JobConfig
from plait.errors import ConfigError
from plait_rocm import plugin
from plait_rocm.devices import AMD_DEVICES

T = 1e12
FNUZ, OCP = ("float8_e4m3fnuz", "float8_e5m2fnuz"), ("float8_e4m3fn", "float8_e5m2")
#: name: (bf16 peak, float8 peak, float8 pair, MX formats), datasheet dense figures of one torch device
EXPECTED = {
    "MI250X": (191.5 * T, None, (), ()),
    "MI300X": (1307.4 * T, 2614.9 * T, FNUZ, ()),
    "MI325X": (1307.4 * T, 2614.9 * T, FNUZ, ()),
    "MI350X": (2306.9 * T, 4613.7 * T, OCP, ("mxfp8", "mxfp4")),
    "MI355X": (2516.6 * T, 5033.2 * T, OCP, ("mxfp8", "mxfp4")),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_amd_gpu_by_architecture_and_name(name):
    bf16_peak, float8_peak, float8_pair, mx = EXPECTED[name]
    device = simulated_device(name)
    caps = device.capabilities
    assert (device.type, device.backend, caps.collective_backend) == ("cuda", "nccl", "rccl")
    assert device.name == SIMULATED_HARDWARE[name].device_name
    assert device.peak_flops == caps.peak_flops["bfloat16"] == pytest.approx(bf16_peak)
    assert caps.peak_flops.get("float8") == (pytest.approx(float8_peak) if float8_peak else None)
    assert caps.float8_dtypes == float8_pair and caps.mx_formats == mx
    assert caps.bf16 and caps.memory_stats
    assert not (caps.deepep or caps.symmetric_memory or caps.has("nvfp4"))
    assert simulated_device(name, dtype="float32").peak_flops == caps.peak_flops["float32"]


def test_every_amd_table_row_is_reachable():
    for index, row in enumerate(AMD_DEVICES):
        earlier = [other.name for other in AMD_DEVICES[:index] if other.name in row.name and other.arch == row.arch]
        assert not earlier, (row.name, earlier)


def test_an_unknown_architecture_gets_a_warning_and_a_conservative_answer(monkeypatch, caplog):
    with simulated_hardware("MI300X"):
        properties = torch.cuda.get_device_properties()
        monkeypatch.setattr(properties, "gcnArchName", "gfx1100")
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "AMD Radeon RX 7900 XTX")
        with caplog.at_level(logging.WARNING, logger="plait.rocm"):
            device = plugin.plait_device(config=JobConfig())
    caps = device.capabilities
    assert (device.backend, caps.collective_backend, device.peak_flops) == ("nccl", "rccl", 0)
    assert caps.bf16 and caps.memory_stats and not (caps.float8_matmul or caps.mx_formats or caps.grouped_mm)
    assert "has the AMD architecture 'gfx1100', which the rocm plugin does not know" in caplog.text


def test_an_unlisted_device_of_a_known_architecture_keeps_its_capabilities(monkeypatch, caplog):
    with simulated_hardware("MI300X"):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "AMD Instinct MI308X")
        with caplog.at_level(logging.WARNING, logger="plait.rocm"):
            device = plugin.plait_device(config=JobConfig())
    assert device.capabilities.float8_dtypes == FNUZ and device.peak_flops == 0
    assert "no datasheet peak FLOPs for 'AMD Instinct MI308X' (gfx942)" in caplog.text


@pytest.mark.parametrize("name", ["cpu", "H100"])
def test_elsewhere_the_core_answers(name):
    with simulated_hardware(name):
        assert plugin.plait_device(config=JobConfig()) is None


def test_async_tp_is_refused_on_rocm_with_the_device_named():
    pytest.importorskip("plait_tp")
    pytest.importorskip("plait_llama3")
    from plait.parallel_dims import ParallelDims
    from plait.testing import check_plugins
    from plait_llama3.spec import llama3_spec
    from plait_tp import plugin as tp_plugin

    config = JobConfig()
    config.model.name, config.model.flavor = "llama3", "debugmodel_tiny"
    config.compile.enable = True
    config.tp = tp_plugin.TPConfig(async_tp=True)
    dims = ParallelDims(tp=2, dp_shard=1, world_size=2)
    with pytest.raises(ConfigError, match=r"the cuda device 'AMD Instinct MI300X' lacks: plugin 'plait_tp.plugin' "
                                          r"needs symmetric_memory \(drop --tp.async_tp\)"):
        check_plugins(tp_plugin, config=config, parallel_dims=dims, model_spec=llama3_spec(),
                      device=simulated_device("MI300X"))
    config.tp = tp_plugin.TPConfig()
    assert check_plugins(tp_plugin, config=config, parallel_dims=dims, model_spec=llama3_spec(),
                         device=simulated_device("MI300X")).device.capabilities.collective_backend == "rccl"


@pytest.mark.skipif(not (torch.version.hip and torch.cuda.is_available()), reason="needs an AMD GPU and a ROCm torch")
def test_this_amd_gpu_is_known():
    device = plugin.plait_device(config=JobConfig())
    assert device.capabilities.collective_backend == "rccl"
    assert device.capabilities.peak_flops, f"{device.name} has no datasheet peaks: add it to AMD_DEVICES"
    torch.cuda.reset_peak_memory_stats()
    block = torch.empty(2**20, dtype=torch.uint8, device="cuda")
    assert device.capabilities.memory_stats and torch.cuda.max_memory_allocated() >= 2**20
    del block
