import sys

import pytest

from plait.errors import ConfigError, PluginError
from plait.plugins import PluginManager, installed_plugins, recipe_owner

GOOD = """
from plait import hookimpl
PLAIT_API_VERSION = 1
PROVIDES = ("demo",)
REQUIRES = ()
"""


def test_discovery_lists_without_importing(make_plugin):
    module = make_plugin("demo", GOOD + "\nraise RuntimeError('imported')\n")
    plugins = installed_plugins()
    assert plugins["demo"].distribution == "fake-demo"
    assert plugins["demo"].version == "0.1"
    assert module not in sys.modules


def test_enable_imports_and_registers(make_plugin):
    module = make_plugin("demo", GOOD)
    manager = PluginManager()
    assert module not in sys.modules
    manager.enable(["demo"])
    assert manager.enabled == ["demo"]
    assert manager.provides("demo")
    assert not manager.provides("tp")


def test_import_failure_says_why(make_plugin):
    make_plugin("broken", GOOD + "\nimport not_a_module_xyz\n")
    with pytest.raises(PluginError, match=r"'broken' \(fake-broken 0.1\) failed to import: "
                                          r"ModuleNotFoundError: No module named 'not_a_module_xyz'"):
        PluginManager().enable(["broken"])


def test_api_version_mismatch_names_both_versions(make_plugin):
    make_plugin("old", GOOD.replace("PLAIT_API_VERSION = 1", "PLAIT_API_VERSION = 7"))
    with pytest.raises(PluginError, match="built for plait plugin API 7.*provides API 1"):
        PluginManager().enable(["old"])


def test_missing_dependency_names_the_flag(make_plugin):
    make_plugin("child", GOOD.replace("REQUIRES = ()", "REQUIRES = ('parent',)"))
    with pytest.raises(PluginError, match="'child' requires plugin 'parent'.*--plugins child,parent"):
        PluginManager().enable(["child"])


def test_dependency_satisfied_in_one_call(make_plugin):
    make_plugin("child", GOOD.replace("REQUIRES = ()", "REQUIRES = ('parent',)"))
    make_plugin("parent", GOOD)
    manager = PluginManager()
    manager.enable(["child", "parent"])
    assert set(manager.enabled) == {"child", "parent"}


def test_unknown_plugin_suggests_close_name(make_plugin):
    make_plugin("demo", GOOD)
    with pytest.raises(PluginError, match="unknown plugin 'dmeo'. Did you mean 'demo'"):
        PluginManager().enable(["dmeo"])


def test_first_party_not_installed_names_the_package(monkeypatch):
    monkeypatch.setenv("PLAIT_LOAD_PLUGINS", "")
    with pytest.raises(PluginError, match="plugin 'deepep' is not installed: pip install plait-deepep"):
        PluginManager().enable(["deepep"])


def test_misspelled_hook_is_an_error(make_plugin):
    make_plugin("typo", GOOD + "\n@hookimpl\ndef plait_validat(config):\n    pass\n")
    with pytest.raises(PluginError, match="unknown hook"):
        PluginManager().enable(["typo"])


def test_duplicate_model_names_both_plugins(make_plugin):
    source = GOOD + """
from plait.model_spec import ModelSpec
@hookimpl
def plait_register_models(register):
    register(ModelSpec(name="same", flavors={"a": 1}, build=lambda a: None, flops_per_token=lambda a, s: 0.0))
"""
    make_plugin("one", source)
    make_plugin("two", source)
    manager = PluginManager()
    manager.enable(["one", "two"])
    with pytest.raises(PluginError, match="model 'same' is registered twice: by '(one|two)' and by '(one|two)'"):
        manager.model_specs


def test_config_sections_and_recipes(make_plugin):
    make_plugin("sect", GOOD + """
from dataclasses import dataclass
from plait.config import JobConfig, ModelSection
@dataclass(kw_only=True)
class SectConfig:
    level: int = 3
@hookimpl
def plait_add_config_sections(register):
    register("sect", SectConfig)
def sect_recipe():
    return JobConfig(model=ModelSection(name="whatever"))
""", recipes=("sect_recipe",))
    owner, fn = recipe_owner("sect_recipe")
    assert owner == "sect"
    assert fn().model.name == "whatever"
    manager = PluginManager()
    manager.enable(["sect"])
    assert list(manager.config_sections) == ["sect"]


def test_section_may_not_shadow_core(make_plugin):
    make_plugin("shadow", GOOD + """
@hookimpl
def plait_add_config_sections(register):
    register("training", dict)
""")
    manager = PluginManager()
    manager.enable(["shadow"])
    with pytest.raises(PluginError, match="core section"):
        manager.config_sections


def test_unknown_recipe_suggests():
    with pytest.raises(ConfigError, match="unknown recipe 'llama3_debugmodle'"):
        recipe_owner("llama3_debugmodle")


def test_load_plugins_env_restricts(make_plugin, monkeypatch):
    make_plugin("demo", GOOD)
    make_plugin("other", GOOD)
    monkeypatch.setenv("PLAIT_LOAD_PLUGINS", "other")
    assert list(installed_plugins()) == ["other"]
