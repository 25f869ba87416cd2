"""Packaging: the plugin module, its hooks (registration, validation) and the recipes."""
from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import plait
import pytest
from plait.config import JobConfig
from plait_deepseek_v3 import config_registry, plugin
from plait_deepseek_v3.spec import FLAVORS

RECIPES = ("deepseek_v3_debugmodel", "deepseek_v3_16b", "deepseek_v3_671b")


def test_plugin_module_imports_without_torch() -> None:
    code = "import sys, plait_deepseek_v3.plugin, plait_deepseek_v3.config_registry; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_plugin_constants_and_registration() -> None:
    assert plugin.PLAIT_API_VERSION == plait.PLUGIN_API_VERSION
    assert plugin.PROVIDES == ("model:deepseek_v3",)
    assert plugin.REQUIRES == ()
    assert plugin.DESCRIPTION
    registered = []
    plugin.plait_register_models(register=registered.append)
    assert [spec.name for spec in registered] == ["deepseek_v3"]


def test_entry_points_are_installed() -> None:
    plugins = {ep.name: ep.value for ep in metadata.entry_points(group="plait.plugins")}
    assert plugins.get("deepseek_v3") == "plait_deepseek_v3.plugin"
    recipes = {ep.name: ep for ep in metadata.entry_points(group="plait.recipes")}
    for name in RECIPES:
        assert recipes[name].load() is getattr(config_registry, name)


def test_model_spec_loads_through_the_plugin_manager() -> None:
    from plait.plugins import load_model_spec

    spec = load_model_spec("deepseek_v3")
    assert spec.name == "deepseek_v3"
    assert spec.provided_by == "deepseek_v3"


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_are_valid_jobs(recipe: str) -> None:
    config = getattr(config_registry, recipe)()
    assert isinstance(config, JobConfig)
    config.validate()
    assert config.model.name == "deepseek_v3" and config.model.flavor in FLAVORS
    assert config.moe.load_balance_coeff > 0  # aux-loss-free balancing, as DeepSeek-V3 trains
