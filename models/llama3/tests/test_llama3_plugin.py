"""Packaging: the plugin module, its registration hook and the recipes."""
from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest

import plait
from plait.config import JobConfig
from plait_llama3 import config_registry, plugin

RECIPES = ("llama3_debugmodel", "llama3_8b", "llama3_70b", "llama3_405b")


def test_plugin_module_imports_without_torch() -> None:
    code = "import sys, plait_llama3.plugin, plait_llama3.config_registry; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_plugin_constants() -> None:
    assert plugin.PLAIT_API_VERSION == plait.PLUGIN_API_VERSION
    assert plugin.PROVIDES == ("model:llama3",)
    assert plugin.REQUIRES == ()
    assert plugin.DESCRIPTION


def test_hook_registers_the_spec() -> None:
    registered = []
    plugin.plait_register_models(register=registered.append)
    assert [spec.name for spec in registered] == ["llama3"]


def test_entry_points_are_installed() -> None:
    plugins = {ep.name: ep.value for ep in metadata.entry_points(group="plait.plugins")}
    assert plugins.get("llama3") == "plait_llama3.plugin"
    recipes = {ep.name: ep for ep in metadata.entry_points(group="plait.recipes")}
    for name in RECIPES:
        assert recipes[name].load() is getattr(config_registry, name)


def test_model_spec_loads_through_the_plugin_manager() -> None:
    from plait.plugins import load_model_spec

    spec = load_model_spec("llama3")
    assert spec.name == "llama3"
    assert spec.provided_by == "llama3"


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_are_valid_jobs(recipe: str) -> None:
    from plait_llama3.spec import FLAVORS

    config = getattr(config_registry, recipe)()
    assert isinstance(config, JobConfig)
    config.validate()
    assert config.model.name == "llama3"
    assert config.model.flavor in FLAVORS
    assert config.training.seq_len <= FLAVORS[config.model.flavor].max_seq_len


def test_published_recipes() -> None:
    lrs = {"llama3_8b": 3e-4, "llama3_70b": 1.5e-4, "llama3_405b": 8e-5}
    for name, lr in lrs.items():
        config = getattr(config_registry, name)()
        assert config.optimizer.lr == lr
        assert (config.training.seq_len, config.training.dtype) == (8192, "bfloat16")
        assert config.activation_checkpoint.mode == "selective"
        assert config.lr_scheduler.warmup_steps == 200
    debug = config_registry.llama3_debugmodel()
    assert (debug.model.flavor, debug.training.steps, debug.checkpoint.interval) == ("debugmodel", 50, 25)
