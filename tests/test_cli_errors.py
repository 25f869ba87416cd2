"""Bad input: one clear message, exit status 2, before any work (nothing written)."""
import pytest

from plait.cli import main

from e2e_helpers import tiny_job

SECTION_PLUGIN = """
from dataclasses import dataclass
from plait import hookimpl
PLAIT_API_VERSION = 1
PROVIDES = ("demo",)
@dataclass(kw_only=True)
class DemoConfig:
    level: int = 3
@hookimpl
def plait_add_config_sections(register):
    register("demo", DemoConfig)
"""


def run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # tyro reports option errors through argparse-style exits
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--plugins", "fdsp"], "unknown plugin 'fdsp'. Did you mean 'fsdp'"),
        (["--plugins", "torchft"], "plugin 'torchft' is not installed: pip install plait-torchft"),
        (["--training.step", "5"], "--training.steps"),
        (["--training.steps", "ten"], "--training.steps"),
        (["--training.dtype", "fp16"], "float32"),
        (["--training.steps", "-3"], "--training.steps must be positive, got -3"),
        (["--model.flavor", "huge"], "model 'llama3' has no flavor 'huge'; choose one of:"),
        (["--parallelism.dp_shard", "2"], "world size is 1"),
        (["--training.global_batch_size", "6"], "must be a multiple of local_batch_size 4"),
        (["--optimizer.lr", "inf"], "--optimizer.lr must be in (0, 10], got inf"),
        (["--optimizer.lr", "1e39"], "--optimizer.lr must be in (0, 10], got 1e+39"),
        (["--optimizer.weight_decay", "inf"], "--optimizer.weight_decay must be in [0, 1000], got inf"),
        (["--optimizer.eps", "nan"], "--optimizer.eps must be in (0, 1), got nan"),
        (["--training.max_norm", "nan"], "--training.max_norm must be finite and >= 0, got nan"),
    ],
)
def test_config_errors_exit_2_before_work(tmp_path, capsys, extra, expected):
    code, output = run(["train", *tiny_job(tmp_path / "run"), *extra], capsys)
    assert code == 2, output
    assert expected in output
    assert not (tmp_path / "run").exists()


def test_degree_without_an_installed_plugin_points_to_the_plugin_list(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("PLAIT_LOAD_PLUGINS", "llama3")  # as if plait-tp were not installed
    code, output = run(["train", *tiny_job(tmp_path), "--parallelism.dp_shard", "1", "--parallelism.tp", "2"], capsys)
    assert code == 2
    assert "--parallelism.tp 2 needs a plugin that provides 'tp'" in output
    assert "no installed plugin provides it" in output and "docs/plugins.md" in output and "--plugins" in output


def test_unknown_recipe(capsys):
    code, output = run(["train", "--config", "llama3_debugmodle"], capsys)
    assert code == 2 and "Did you mean llama3_debugmodel" in output


def test_nothing_selected(capsys):
    code, output = run(["train"], capsys)
    assert code == 2 and "choose what to train" in output and "llama3_debugmodel" in output


def test_help_shows_only_enabled_sections(fake_plugins, capsys):
    fake_plugins("demo", SECTION_PLUGIN)
    code, output = run(["train", "--config", "llama3_debugmodel", "--help"], capsys)
    assert code == 0 and "--training.steps" in output and "--demo.level" not in output
    code, output = run(["train", "--config", "llama3_debugmodel", "--plugins", "demo", "--help"], capsys)
    assert code == 0 and "--demo.level" in output


def test_plugin_section_parses(fake_plugins, tmp_path, capsys):
    fake_plugins("demo", SECTION_PLUGIN)
    code, output = run(["train", *tiny_job(tmp_path), "--plugins", "demo", "--demo.level", "x"], capsys)
    assert code == 2 and "--demo.level" in output


def test_plugins_command_lists_installed(capsys):
    code, output = run(["plugins", "--config", "llama3_debugmodel"], capsys)
    assert code == 0
    line = next(l for l in output.splitlines() if l.startswith("llama3 "))
    assert "plait-llama3" in line and "yes" in line and "model:llama3" in line
    assert "llama3_debugmodel" in output


def test_unknown_command(capsys):
    code, output = run(["trian"], capsys)
    assert code == 2 and "unknown command 'trian'" in output
