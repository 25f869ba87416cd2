"""The --wandb.* options: bad ones are refused before any work, with the fix."""
import subprocess
import sys

import pytest

from plait.cli import main
from plait.errors import ConfigError
from plait_wandb.config import WandbConfig
from plait_wandb.credentials import api_key_configured

from wandb_files import offline_job


def run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # tyro reports option errors through argparse-style exits
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_plugin_module_is_import_light():
    code = "import sys, plait_wandb.plugin; print(sorted({'wandb', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    "options, expected",
    [
        (dict(project=""), "--wandb.project must not be empty"),
        (dict(project="team/proj"), "--wandb.project 'team/proj' is not a valid W&B project name"),
        (dict(entity="my team"), "--wandb.entity 'my team': use letters, digits"),
        (dict(tags=("ok", "")), "--wandb.tags: each tag must be 1 to 64 characters"),
        (dict(tags=("x" * 65,)), "--wandb.tags: each tag must be 1 to 64 characters"),
        (dict(mode="dryrun"), "--wandb.mode must be online, offline or disabled, got 'dryrun'"),
    ],
)
def test_bad_options(options, expected):
    with pytest.raises(ConfigError, match="^" + expected.replace("(", r"\(").replace(".", r"\.")):
        WandbConfig(**options).validate()


def test_good_options():
    WandbConfig(project="llm-pretrain", entity="my-team", tags=("a", "b"), group="sweep 3", mode="offline").validate()


def test_credentials_from_environment_or_netrc(tmp_path, wandb_env, monkeypatch):
    assert not api_key_configured()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert api_key_configured()
    monkeypatch.delenv("WANDB_API_KEY")
    netrc = tmp_path / "netrc"
    netrc.write_text("machine example.org\n  login user\n  password other\n")
    assert not api_key_configured()  # a key for another host
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert api_key_configured()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert not api_key_configured()  # a self-hosted server needs its own key


def test_online_without_an_api_key_is_refused_before_any_work(tmp_path, wandb_env, capsys):
    argv = offline_job(tmp_path / "run", "--wandb.mode", "online")
    code, output = run(["train", *argv], capsys)
    assert code == 2, output
    assert "--wandb.mode online needs a W&B API key" in output
    assert "run `wandb login`" in output and "--wandb.mode offline" in output
    assert not (tmp_path / "run").exists() and not (wandb_env / "wandb").exists()


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--wandb.project", "a/b"], "--wandb.project 'a/b' is not a valid W&B project name"),
        (["--wandb.mode", "sometimes"], "--wandb.mode"),
    ],
)
def test_bad_options_on_the_command_line_exit_2_before_work(tmp_path, wandb_env, capsys, extra, expected):
    code, output = run(["train", *offline_job(tmp_path / "run", *extra)], capsys)
    assert code == 2, output
    assert expected in output
    assert not (tmp_path / "run").exists()
