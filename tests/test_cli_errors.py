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
        (["--plugins", "nosuchfeature"], "plugin 'nosuchfeature' is not installed: pip install plait-nosuchfeature"),
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


@pytest.mark.parametrize("value", ["two", "-1", "0"])
def test_a_bad_world_size_is_a_message(tmp_path, capsys, monkeypatch, value):
    monkeypatch.setenv("WORLD_SIZE", value)
    code, output = run(["train", *tiny_job(tmp_path / "run")], capsys)
    assert code == 2 and f"WORLD_SIZE must be a positive integer (torchrun sets it), got {value!r}" in output
    assert "Traceback" not in output


def test_an_unknown_compile_backend_is_a_message(tmp_path, capsys):
    code, output = run(["train", *tiny_job(tmp_path / "run"), "--compile.enable", "True",
                        "--compile.backend", "turbo"], capsys)
    assert code == 2 and "--compile.backend 'turbo' is not a torch.compile backend" in output and "inductor" in output


def test_run_folders_that_cannot_be_written_stop_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, output = run(["train", *tiny_job(a_file)], capsys)
    assert code == 2 and "--job.dump_folder" in output and "is a file, not a folder" in output
    code, output = run(["train", *tiny_job(a_file / "under")], capsys)
    assert code == 2 and "is not a folder plait can write" in output
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint").write_text("not a folder")
    code, output = run(["train", *tiny_job(run_dir)], capsys)
    assert code == 2 and "--checkpoint.folder" in output
    assert "Traceback" not in output


def test_convert_with_a_malformed_run_config_is_a_message(tmp_path, capsys):
    (tmp_path / "run" / "checkpoint" / "step-1").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text('{"model": "llama3"}')
    code, output = run(["convert", str(tmp_path / "run" / "checkpoint" / "step-1"), str(tmp_path / "out")], capsys)
    assert code == 2 and "the run's config.json is malformed" in output
