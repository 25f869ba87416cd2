"""End to end: train the tiny llama3 on the embedded corpus through the real CLI path."""
import json
import math
import os
import re
import signal
import subprocess
import sys

import pytest

from plait.checkpoint import list_checkpoints
from plait.cli import main, train
from plait.errors import TrainingDivergedError

from e2e_helpers import tiny_job

# Sends SIGTERM to this process after optimizer step STOP_AT, as an operator or a scheduler would.
SIGTERM_PLUGIN = """
import os, signal
from plait import hookimpl
PLAIT_API_VERSION = 1
STOP_AT = int(os.environ.get("FAKE_STOP_AT", "0"))
@hookimpl
def plait_after_optimizer_step(ctx):
    if ctx.step == STOP_AT:
        os.kill(os.getpid(), signal.SIGTERM)
"""

# Returns a NaN loss from step NAN_AT on, as a diverging run would.
NAN_PLUGIN = """
import os
import torch
from plait import hookimpl
PLAIT_API_VERSION = 1
NAN_AT = int(os.environ.get("FAKE_NAN_AT", "0"))
@hookimpl
def plait_forward_backward(ctx):
    if ctx.step >= NAN_AT:
        return torch.tensor(float("nan"))
    return None
"""


def test_loss_goes_down_and_run_folder_is_complete(tmp_path):
    result = train(tiny_job(tmp_path, "--checkpoint.interval", "5", "--optimizer.lr", "1e-2", steps=16))
    losses = result.losses
    assert sorted(losses) == list(range(1, 17))
    assert sum(losses[s] for s in range(13, 17)) / 4 < losses[1] - 0.5, losses
    resolved = json.loads((tmp_path / "config.json").read_text())
    assert resolved["training"]["steps"] == 16 and resolved["model"]["flavor"] == "debugmodel_tiny"
    assert "llama3" in resolved["plugins"]
    assert list_checkpoints(str(tmp_path / "checkpoint")) == [10, 15, 16]  # keep_latest_k 3
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb"))


def test_stop_at_10_and_resume_to_20_is_bit_exact(tmp_path, fake_plugins, monkeypatch):
    fake_plugins("stopper", SIGTERM_PLUGIN)
    reference = train(tiny_job(tmp_path / "ref", "--checkpoint.interval", "5", steps=20)).losses

    monkeypatch.setenv("FAKE_STOP_AT", "10")
    first = train(tiny_job(tmp_path / "resumed", "--checkpoint.interval", "100", "--plugins", "stopper", steps=20))
    assert first.stopped_by_signal and first.last_step == 10
    assert list_checkpoints(str(tmp_path / "resumed" / "checkpoint")) == [10]

    second = train(tiny_job(tmp_path / "resumed", "--checkpoint.interval", "100", steps=20))
    assert sorted(second.losses) == list(range(11, 21))
    combined = {**first.losses, **second.losses}
    assert combined == reference  # bit for bit, fp32 on CPU


def test_sigterm_in_a_real_process_saves_and_exits_cleanly(tmp_path):
    cmd = [sys.executable, "-m", "plait.cli", "train", *tiny_job(tmp_path, "--checkpoint.interval", "1000", steps=500)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        match = re.search(r"step\s+(\d+)\s+loss", line)
        if match and int(match.group(1)) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
    out, _ = proc.communicate(timeout=120)
    output = "".join(lines) + out
    assert proc.returncode == 0, output
    saved = list_checkpoints(str(tmp_path / "checkpoint"))
    assert len(saved) == 1 and 3 <= saved[0] < 500, output
    assert "SIGTERM" in output and "resume with the same command" in output


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tmp_path, fake_plugins, monkeypatch, capsys):
    fake_plugins("nan", NAN_PLUGIN)
    monkeypatch.setenv("FAKE_NAN_AT", "5")
    argv = tiny_job(tmp_path, "--checkpoint.interval", "2", "--plugins", "nan", steps=8)
    with pytest.raises(TrainingDivergedError, match=r"step 5: loss is nan.*last good checkpoint \(step 4"):
        train(argv)
    assert list_checkpoints(str(tmp_path / "checkpoint")) == [2, 4]
    assert main(["train", *argv]) == 1  # the CLI prints the message, no traceback
    assert "loss is nan" in capsys.readouterr().err


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    big = train(tiny_job(tmp_path / "a", "--training.local_batch_size", "8", steps=3)).losses
    accumulated = train(tiny_job(tmp_path / "b", "--training.global_batch_size", "8", steps=3)).losses
    for step in big:
        assert math.isclose(big[step], accumulated[step], rel_tol=0, abs_tol=2e-6), (big, accumulated)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_the_numbers(tmp_path, mode):
    plain = train(tiny_job(tmp_path / "plain", steps=3)).losses
    ac = train(tiny_job(tmp_path / mode, "--activation_checkpoint.mode", mode, steps=3)).losses
    for step in plain:
        assert math.isclose(plain[step], ac[step], abs_tol=1e-6)


def test_bfloat16_trains_close_to_float32(tmp_path):
    fp32 = train(tiny_job(tmp_path / "fp32", steps=2)).losses
    bf16 = train(tiny_job(tmp_path / "bf16", "--training.dtype", "bfloat16", steps=2)).losses
    assert abs(fp32[1] - bf16[1]) < 0.05


def test_compile_matches_eager(tmp_path):
    eager = train(tiny_job(tmp_path / "eager", steps=2)).losses
    compiled = train(tiny_job(tmp_path / "compiled", "--compile.enable", "True", steps=2)).losses
    for step in eager:
        assert math.isclose(eager[step], compiled[step], abs_tol=1e-4)
