"""The `plait` command line: one parser style for every command, help on every option,
clear errors for options of plugins that are not enabled. In-process ``main([...])`` calls
on throwaway plugins, so only the core has to be installed."""
import dataclasses
import os
import sys
import typing

import pytest

from plait import __version__, config
from plait.cli import PlanOptions, Selection, field_help, main, parse, parse_selection

MODEL = """
from dataclasses import dataclass
from plait import hookimpl
from plait.config import JobConfig, ModelSection
PLAIT_API_VERSION = 1
PROVIDES = ("model:toy",)
DESCRIPTION = "toy: a model that only needs to parse"
@dataclass(kw_only=True)
class ToyConfig:
    width: int = 4
    \"\"\"Width of the toy.\"\"\"
@hookimpl
def plait_add_config_sections(register):
    register("toy", ToyConfig)
def toy_debug():
    return JobConfig(model=ModelSection(name="toy"))
"""

DEMO = """
from dataclasses import dataclass
from plait import hookimpl
PLAIT_API_VERSION = 1
PROVIDES = ("demo",)
REQUIRES = ()
DESCRIPTION = "demo: adds the --demo.* section"
@dataclass(kw_only=True)
class DemoConfig:
    level: int = 3
    \"\"\"How much demo.\"\"\"
    verbose: bool = False
@hookimpl
def plait_add_config_sections(register):
    register("demo", DemoConfig)
"""


@pytest.fixture
def installed(make_plugin, monkeypatch):
    make_plugin("toy", MODEL, recipes=("toy_debug",))
    make_plugin("demo", DEMO)
    monkeypatch.setenv("PLAIT_LOAD_PLUGINS", "toy,demo")  # only the throwaway plugins are visible


def run(argv, capsys):
    code = main(argv)  # main returns every exit status, tyro's included
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return code, out.out, out.err


def test_version(installed, capsys):
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.startswith(f"plait {__version__}") and "2 plugins installed" in out


def test_top_level_help_lists_selection_and_what_is_installed_without_importing(installed, capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for command in ("train", "plugins", "plan", "convert"):
        assert f"\n  {command} " in out
    help_of = field_help(Selection)
    for option in ("config", "model", "plugins"):
        assert f"--{option} " in out and help_of[option] in out
    assert "toy_debug" in out and "models (--model):" in out and "toy" in out and "demo" in out
    assert not [m for m in sys.modules if m.startswith("fake_")]  # read from the sources


def test_train_help_shows_selection_recipes_and_field_help(installed, capsys):
    code, out, _ = run(["train", "--config", "toy_debug", "--help"], capsys)
    assert code == 0
    for option in ("--config RECIPE", "--model NAME", "--plugins A,B", "--training.steps",
                   "--optimizer.lr", "--toy.width", "Width of the toy"):
        assert option in out, option
    assert "Optimizer steps to train for" in out and "Peak learning rate" in out
    assert "toy_debug" in out and "--demo.level" not in out  # demo is not enabled
    code, out, _ = run(["train", "--config", "toy_debug", "--plugins", "demo", "-h"], capsys)
    assert code == 0 and "--demo.level" in out and "How much demo" in out


@pytest.mark.parametrize("name, section", sorted(typing.get_type_hints(config.JobConfig).items()))
def test_every_core_config_field_has_help(name, section):
    """tyro shows a field's docstring as its help: every --section.field a user sets has one."""
    assert set(field_help(section)) == {f.name for f in dataclasses.fields(section)}, name


def test_option_of_a_plugin_that_is_not_enabled(installed, capsys):
    code, _, err = run(["train", "--config", "toy_debug", "--demo.level", "5"], capsys)
    assert code == 2
    assert err.startswith("plait: error: --demo.level: --demo.* belongs to plugin 'demo', which is not enabled: "
                          "add --plugins demo")
    code, _, err = run(["train", "--config", "toy_debug", "--demo.level=5"], capsys)
    assert code == 2 and "add --plugins demo" in err


@pytest.mark.parametrize("argv, expected", [
    (["--training.step", "5"], "unrecognized option --training.step. Did you mean --training.steps"),
    (["--lr", "0.1"], "Did you mean --optimizer.lr?"),
    (["--plugins", "demo", "--demo.levl", "1"], "Did you mean --demo.level"),
    (["stray"], "unexpected argument stray"),
])
def test_unknown_options_suggest_close_matches(installed, capsys, argv, expected):
    code, _, err = run(["train", "--config", "toy_debug", *argv], capsys)
    assert code == 2 and err.startswith("plait: error: ") and expected in err


def test_bad_value_and_unknown_command_exit_2(installed, capsys):
    code, _, err = run(["train", "--config", "toy_debug", "--training.steps", "ten"], capsys)
    assert code == 2 and "--training.steps" in err
    code, _, err = run(["trian"], capsys)
    assert code == 2 and "unknown command 'trian'. Did you mean 'train'?" in err


def test_selection_is_parsed_first_and_leaves_the_rest():
    selection, rest = parse_selection(["--training.steps", "-3", "--plugins", "a, b", "--model", "m", "--help"])
    assert selection == Selection(model="m", plugins="a, b") and selection.plugin_names == ["a", "b"]
    assert rest == ["--training.steps", "-3", "--help"]


def test_plan_options_keep_both_spellings():
    for argv in (["--world-size", "8", "--device-memory-gib", "80"],
                 ["--world_size", "8", "--device_memory_gib", "80"]):
        options, rest = parse(PlanOptions, [*argv, "--training.steps", "2"], prog="plait plan", partial=True)
        assert options == PlanOptions(world_size=8, device_memory_gib=80.0) and rest == ["--training.steps", "2"]


def test_plan_help_and_missing_world_size(installed, capsys):
    code, out, _ = run(["plan", "--config", "toy_debug", "--help"], capsys)
    assert code == 0 and "--world_size N" in out and "--device_memory_gib" in out and "--training.steps" in out
    code, _, err = run(["plan", "--config", "toy_debug"], capsys)
    assert code == 2 and "--world-size N" in err


def test_preprocess_needs_an_output_folder(installed, capsys):
    code, _, err = run(["preprocess", "--config", "toy_debug"], capsys)
    assert code == 2 and "--output FOLDER" in err


def test_plugins_lists_descriptions_without_importing(installed, capsys):
    code, out, _ = run(["plugins"], capsys)
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("toy ", "demo "))}
    assert "model:toy" in rows["toy"] and "toy: a model that only needs to parse" in rows["toy"]
    assert "demo: adds the --demo.* section" in rows["demo"] and rows["demo"].split()[3] == "no"
    assert "recipes (1): toy_debug" in out
    assert not [m for m in sys.modules if m.startswith("fake_")]
    code, out, _ = run(["plugins", "--plugins", "demo", "--model", "toy"], capsys)
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("toy ", "demo "))}
    assert code == 0 and rows["demo"][3] == rows["toy"][3] == "yes"


def test_convert_passes_dtype(installed, capsys, monkeypatch, tmp_path):
    import torch

    import plait.hf
    import plait.plugins

    calls = []
    spec = type("Spec", (), {"name": "toy", "args_for": lambda self, flavor: flavor})()
    monkeypatch.setattr(plait.plugins, "load_model_spec", lambda name: spec)
    monkeypatch.setattr(plait.hf, "export_checkpoint_to_hf",
                        lambda ckpt, spec, args, out, *, dtype: calls.append((args, out, dtype)))
    argv = ["convert", str(tmp_path), str(tmp_path / "hf"), "--model", "toy", "--flavor", "tiny"]
    code, out, _ = run([*argv, "--dtype", "bfloat16"], capsys)
    # Written beside the output, then renamed to it whole.
    assert code == 0 and [(a, d) for a, _, d in calls] == [("tiny", torch.bfloat16)] and "bfloat16" in out
    staging = calls[0][1]
    assert os.path.dirname(staging) == str(tmp_path) and os.path.basename(staging).startswith(".hf.partial-")
    assert (tmp_path / "hf").is_dir() and not os.path.exists(staging)
    code, _, err = run([*argv, "--dtype", "fp8"], capsys)
    assert code == 2 and "float16" in err
