"""Without DeepEP, without GPUs or without expert parallelism, the deepep plugin is refused
before any work, with one message naming everything that is missing."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from plait.cli import main
from plait.errors import ConfigError
from plait_deepep import plugin
from plait_deepep.config import DeepEPConfig


def job(dtype: str = "bfloat16") -> SimpleNamespace:
    return SimpleNamespace(training=SimpleNamespace(dtype=dtype), deepep=DeepEPConfig())


def test_missing_library_and_dtype_are_named_together(monkeypatch):
    monkeypatch.setattr(plugin.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError) as error:
        plugin.plait_validate(config=job("float32"), parallel_dims=SimpleNamespace(ep_enabled=True), model_spec=None)
    message = str(error.value)
    for expected in ("the deep_ep library (not installed", "--training.dtype bfloat16",
                     "Drop deepep from --plugins"):  # fmt: skip
        assert expected in message


def test_nothing_missing_passes(monkeypatch):
    monkeypatch.setattr(plugin.importlib.util, "find_spec", lambda name: object())
    plugin.plait_validate(config=job(), parallel_dims=SimpleNamespace(ep_enabled=True), model_spec=None)


@pytest.mark.parametrize(("device", "accepted"), [("cpu", False), ("A100", False), ("H100", True), ("B200", True)])
def test_the_device_needs_the_deepep_capability(device, accepted, monkeypatch):
    from plait.capabilities import simulated_device
    from plait.config import JobConfig
    from plait.parallel_dims import ParallelDims
    from plait.plugins import load_model_spec
    from plait.testing import check_plugins

    monkeypatch.setattr(plugin.importlib.util, "find_spec", lambda name: object())
    config = JobConfig()
    config.model.name, config.model.flavor, config.training.dtype = "qwen3", "debugmodel_moe", "bfloat16"
    config.deepep = DeepEPConfig()
    dims = ParallelDims(ep=2, dp_shard=2, world_size=2)
    check = lambda: check_plugins(plugin, config=config, parallel_dims=dims, model_spec=load_model_spec("qwen3"),
                                  device=simulated_device(device))  # noqa: E731
    if accepted:
        assert check().device.capabilities.deepep
        return
    with pytest.raises(ConfigError, match=r"lacks: plugin 'plait_deepep.plugin' needs deepep \(drop deepep from "
                                          r"--plugins to dispatch with the ep plugin's all-to-all instead\)"):
        check()


def test_without_expert_parallelism_is_refused():
    with pytest.raises(ConfigError, match="set --parallelism.ep > 1 or drop deepep"):
        plugin.plait_validate(config=job(), parallel_dims=SimpleNamespace(ep_enabled=False), model_spec=None)


@pytest.mark.parametrize("num_sms", [0, 1, 23])
def test_num_sms_must_be_even(num_sms):
    with pytest.raises(ConfigError, match="--deepep.num_sms"):
        DeepEPConfig(num_sms=num_sms).validate()


def run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_cli_refuses_deepep_on_this_machine(capsys):
    """`plait plan` validates exactly as `plait train` on 2 ranks would."""
    code, output = run(["plan", "--world-size", "2", "--config", "qwen3_moe_debugmodel", "--plugins", "ep,fsdp,deepep",
                        "--parallelism.ep", "2", "--training.dtype", "bfloat16"], capsys)
    assert code == 2, output
    assert "the cpu lacks: plugin 'deepep' needs deepep (drop deepep from --plugins" in output


def test_deepep_without_ep_names_the_missing_plugin(capsys):
    code, output = run(["plan", "--world-size", "2", "--config", "qwen3_moe_debugmodel", "--plugins", "fsdp,deepep",
                        "--parallelism.ep", "2"], capsys)
    assert code == 2, output
    assert "plugin 'deepep' requires plugin 'ep': add it, e.g. --plugins fsdp,deepep,ep" in output
