"""Packaging: the plugin module, its hooks (registration, validation) and the recipes."""
from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata

import plait
import pytest
from plait.config import JobConfig
from plait_qwen3 import config_registry, plugin
from plait_qwen3.spec import FLAVORS

RECIPES = (
    "qwen3_debugmodel", "qwen3_moe_debugmodel", "qwen3_0_6b", "qwen3_1_7b", "qwen3_4b", "qwen3_8b", "qwen3_14b",
    "qwen3_32b", "qwen3_30b_a3b", "qwen3_235b_a22b",
)  # fmt: skip


def test_plugin_module_imports_without_torch() -> None:
    code = "import sys, plait_qwen3.plugin, plait_qwen3.config_registry; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_plugin_constants_and_registration() -> None:
    assert plugin.PLAIT_API_VERSION == plait.PLUGIN_API_VERSION
    assert plugin.PROVIDES == ("model:qwen3",)
    assert plugin.REQUIRES == ()
    assert plugin.DESCRIPTION
    registered = []
    plugin.plait_register_models(register=registered.append)
    assert [spec.name for spec in registered] == ["qwen3"]


def test_entry_points_are_installed() -> None:
    plugins = {ep.name: ep.value for ep in metadata.entry_points(group="plait.plugins")}
    assert plugins.get("qwen3") == "plait_qwen3.plugin"
    recipes = {ep.name: ep for ep in metadata.entry_points(group="plait.recipes")}
    for name in RECIPES:
        assert recipes[name].load() is getattr(config_registry, name)


def test_model_spec_loads_through_the_plugin_manager() -> None:
    from plait.plugins import load_model_spec

    spec = load_model_spec("qwen3")
    assert spec.name == "qwen3"
    assert spec.provided_by == "qwen3"


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_are_valid_jobs(recipe: str) -> None:
    config = getattr(config_registry, recipe)()
    assert isinstance(config, JobConfig)
    config.validate()
    assert config.model.name == "qwen3"
    assert config.model.flavor in FLAVORS
    assert config.training.seq_len <= FLAVORS[config.model.flavor].max_seq_len
    is_moe = FLAVORS[config.model.flavor].is_moe
    assert (config.moe.aux_loss_coeff > 0) is is_moe
    assert config.moe.load_balance_coeff == 0  # HF Qwen3-MoE has no expert bias to export


def test_published_recipes() -> None:
    flavors = {"qwen3_0_6b": "0.6B", "qwen3_8b": "8B", "qwen3_32b": "32B", "qwen3_235b_a22b": "235B-A22B"}
    for name, flavor in flavors.items():
        config = getattr(config_registry, name)()
        assert config.model.flavor == flavor
        assert (config.training.seq_len, config.training.dtype, config.compile.enable) == (4096, "bfloat16", True)
    moe = config_registry.qwen3_30b_a3b()
    assert (moe.moe.aux_loss_coeff, moe.moe.aux_loss_type) == (1e-3, "batch")
    debug = config_registry.qwen3_moe_debugmodel()
    assert (debug.model.flavor, debug.training.steps, debug.checkpoint.interval) == ("debugmodel_moe", 50, 25)


@pytest.mark.parametrize(
    ("recipe", "tp", "message"),
    [
        ("qwen3_debugmodel", 3, r"--parallelism.tp 3 does not divide n_heads = 8 of qwen3/debugmodel.*valid: 1, 2, 4"),
        ("qwen3_debugmodel", 8, r"--parallelism.tp 8 does not divide kv_heads = 4 of qwen3/debugmodel"),
    ],
)
def test_tp_validation_errors_from_the_command_line(
    recipe: str, tp: int, message: str, tmp_path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("plait_tp", reason="needs the tp plugin (plait-tp)")
    from plait.cli import main

    monkeypatch.setenv("WORLD_SIZE", str(tp))
    argv = ["train", "--config", recipe, "--plugins", "tp", "--parallelism.tp", str(tp),
            "--parallelism.dp_shard", "1", "--job.dump_folder", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_tp_must_divide_the_experts_hidden_width() -> None:
    pytest.importorskip("plait_tp", reason="needs the tp plugin (plait-tp)")
    import dataclasses

    from plait.errors import ConfigError
    from plait_qwen3.spec import qwen3_spec
    from plait_tp.plugin import check_divisibility

    moe = FLAVORS["debugmodel_moe"]
    odd = dataclasses.replace(moe, moe=dataclasses.replace(moe.moe, hidden_dim=250))
    check_divisibility(2, qwen3_spec(), odd, "debugmodel_moe")
    with pytest.raises(ConfigError, match=r"--parallelism.tp 4 does not divide moe.hidden_dim = 250 .*valid: 1, 2\)"):
        check_divisibility(4, qwen3_spec(), odd, "debugmodel_moe")
    check_divisibility(4, qwen3_spec(), FLAVORS["debugmodel"], "debugmodel")  # dense: no moe.hidden_dim to check
