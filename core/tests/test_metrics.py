from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from plait.config import MetricsSection
from plait.errors import ConfigError
from plait.metrics import (
    MetricsProcessor,
    format_rate,
    peak_memory_bytes,
    reset_peak_memory,
)

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
ERASE_LINE = "\r\x1b[2K"


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """rich reads these to decide what a terminal is and how wide it is."""
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COLUMNS", "120")


def screen(output: str) -> list[str]:
    """What a terminal shows: a carriage return goes to column 0, ESC[2K erases the line."""
    return [ANSI.sub("", line.rsplit("\r", 1)[-1]) for line in output.split("\n")]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_processor(tmp_path: Path, **overrides) -> MetricsProcessor:
    config = overrides.pop("config", MetricsSection(enable_tensorboard=False, progress="off"))
    arguments = dict(
        dump_folder=str(tmp_path),
        total_steps=10,
        flops_per_token=1e9,
        peak_flops=1e13,
        device_type="cpu",
    )
    arguments.update(overrides)
    return MetricsProcessor(config, **arguments)


def record(mp: MetricsProcessor, step: int, **overrides) -> dict[str, float]:
    arguments = dict(loss=2.5, grad_norm=1.25, lr=8e-4, tokens=4096, seconds=0.5)
    arguments.update(overrides)
    return mp.record_step(step, **arguments)


@pytest.fixture
def plait_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="plait")
    return caplog


@contextlib.contextmanager
def logging_only_to(stream: io.StringIO) -> Iterator[None]:
    """The ``plait`` logger printing to ``stream`` alone, as the trainer would configure it.

    Entered inside the test body: pytest attaches its capture handlers after fixtures run.
    """
    plait_logger = logging.getLogger("plait")
    saved = (plait_logger.handlers, plait_logger.level, plait_logger.propagate)
    plait_logger.handlers = [logging.StreamHandler(stream)]
    plait_logger.setLevel(logging.INFO)
    plait_logger.propagate = False
    try:
        yield
    finally:
        plait_logger.handlers, plait_logger.propagate = saved[0], saved[2]
        plait_logger.setLevel(saved[1])


def test_throughput_tflops_and_mfu_follow_from_the_inputs(tmp_path: Path) -> None:
    mp = make_processor(tmp_path, num_devices=2, flops_per_token=3e9, peak_flops=5e13)
    metrics = record(mp, 1, tokens=8192, seconds=0.25, extra={"loss/aux": 0.125})
    tps = 8192 / 0.25 / 2
    assert metrics["tps"] == pytest.approx(tps, rel=1e-12)
    assert metrics["tflops"] == pytest.approx(3e9 * tps / 1e12, rel=1e-12)
    assert metrics["mfu"] == pytest.approx(100 * 3e9 * tps / 5e13, rel=1e-12)
    assert (metrics["loss"], metrics["grad_norm"], metrics["lr"]) == (2.5, 1.25, 8e-4)
    assert metrics["loss/aux"] == 0.125
    assert metrics["memory/peak_gib"] == pytest.approx(peak_memory_bytes("cpu") / 2**30, rel=0.05)
    # Per step, not averaged: a second step twice as fast reports twice the throughput.
    assert record(mp, 2, tokens=8192, seconds=0.125)["tps"] == pytest.approx(2 * tps, rel=1e-12)


def test_mfu_is_left_out_when_the_peak_is_unknown(tmp_path: Path, plait_log) -> None:
    metrics = record(make_processor(tmp_path, peak_flops=0.0), 10)
    assert "mfu" not in metrics
    assert "mfu" not in plait_log.messages[-1]


def test_bad_inputs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="log_freq"):
        make_processor(tmp_path, config=MetricsSection(log_freq=0, enable_tensorboard=False))
    mp = make_processor(tmp_path)
    with pytest.raises(ValueError, match="collides"):
        record(mp, 1, extra={"loss": 1.0})
    with pytest.raises(ValueError, match="seconds must be positive"):
        record(mp, 1, seconds=0.0)


def test_logs_every_log_freq_steps_and_the_last(tmp_path: Path, plait_log) -> None:
    config = MetricsSection(log_freq=3, enable_tensorboard=False, progress="off")
    mp = make_processor(tmp_path, config=config, total_steps=10)
    for step in range(1, 11):
        record(mp, step, loss=float(step))
    logged_steps = [int(re.match(r"step\s+(\d+)", m).group(1)) for m in plait_log.messages]
    assert logged_steps == [3, 6, 9, 10]
    assert all(r.name == "plait" for r in plait_log.records)


def test_console_line_is_aligned_and_plain_off_a_terminal(tmp_path: Path, plait_log) -> None:
    mp = make_processor(tmp_path, total_steps=100, flops_per_token=1e8, peak_flops=1e14)
    record(mp, 9, loss=6.1234, grad_norm=1.23, lr=8e-4, tokens=12345, seconds=1.0, extra={"z": 0.5},
           tokens_seen=111105, data_wait_seconds=0.0031)
    record(mp, 10, loss=10.5, grad_norm=12.5, lr=1e-3, tokens=1234567, seconds=1.0,
           tokens_seen=1345672, data_wait_seconds=0.25)
    first, second = plait_log.messages
    assert not ANSI.search(first)
    assert re.fullmatch(
        r"step   9  loss  6\.1234  grad_norm  1\.230  lr 8\.00e-04  tps    12,345  tflops   1\.23"
        r"  mfu  1\.23%  mem +\d+\.\d\dGiB  time  1\.000s  data   3\.1ms  seen 111\.1K  z 0\.5",
        first,
    ), first
    assert second.endswith("time  1.000s  data 250.0ms  seen 1.346M")
    # Same columns on the next line, wider numbers included.
    assert first.index("grad_norm") == second.index("grad_norm")
    assert first.index("tflops") == second.index("tflops")


def test_counts_are_compact():
    from plait.metrics import format_count

    assert [format_count(v) for v in (999, 1000, 123456, 7.5e9, 2.5e13)] == ["999", "1K", "123.5K", "7.5B", "25T"]


def test_the_run_record_gives_the_batch_config_and_hparams(tmp_path: Path, plait_log) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mp = make_processor(tmp_path, config=MetricsSection(progress="off"))
    batch = {"local_sequences": 4, "dp_degree": 8, "accumulation_steps": 2, "global_sequences": 64,
             "global_tokens": 131072}
    mp.record_run(1, config={"training": {"steps": 10, "seq_len": 2048}, "plugins": ["fsdp"]}, batch=batch)
    mp.close()
    assert plait_log.messages == [
        "global batch 64 sequences = 131,072 tokens per step (local 4 × data-parallel 8 × accumulation 2)"
    ]
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    assert {f"batch/{key}" for key in batch} <= set(events.Tags()["scalars"])
    assert events.Scalars("batch/accumulation_steps")[0].value == 2
    (text,) = events.Tensors("config/text_summary")
    assert '"seq_len": 2048' in text.tensor_proto.string_val[0].decode()
    plugin_data = events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    assert b"training.seq_len" in plugin_data and b"plugins" in plugin_data


def test_console_line_is_colored_only_for_terminal_handlers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    mp = make_processor(tmp_path)
    terminal, file = FakeTerminal(), io.StringIO()
    with logging_only_to(terminal):
        record(mp, 10)
        monkeypatch.setenv("NO_COLOR", "1")
        record(mp, 10)
    colored, plain = terminal.getvalue().splitlines()
    assert ANSI.search(colored) and ANSI.sub("", colored) == plain
    assert plain.startswith("step 10  loss  2.5000")
    monkeypatch.delenv("NO_COLOR")
    with logging_only_to(file):
        record(mp, 10)
    assert file.getvalue() == plain + "\n"


def test_tensorboard_sees_the_exact_values(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = MetricsSection(log_freq=2, tensorboard_folder="tb", progress="off")
    mp = make_processor(tmp_path, config=config, total_steps=5)
    expected: dict[int, dict[str, float]] = {}
    for step in range(1, 6):
        metrics = record(
            mp, step, loss=3.0 - 0.1 * step, lr=1e-4 * step, seconds=0.1 * step, extra={"val/loss": step / 7}
        )
        if step in (2, 4, 5):
            expected[step] = metrics
    mp.close()
    mp.close()  # idempotent

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    names = {
        "loss": "loss", "grad_norm": "grad_norm", "lr": "lr", "throughput/tps": "tps",
        "throughput/tflops": "tflops", "throughput/mfu": "mfu",
        "memory/peak_gib": "memory/peak_gib", "time/step_seconds": "step_seconds", "val/loss": "val/loss",
    }  # fmt: skip
    assert set(events.Tags()["scalars"]) == set(names)
    for tag, key in names.items():
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [2, 4, 5]
        for scalar in scalars:
            assert scalar.value == np.float32(expected[scalar.step][key]), (tag, scalar.step)


def test_details_go_to_tensorboard_but_not_to_the_console(tmp_path: Path, plait_log) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mp = make_processor(tmp_path, config=MetricsSection(progress="off"))
    details = {f"moe/layer{i}/max_load_ratio": 1.0 + i for i in range(3)}
    metrics = record(mp, 10, extra={"moe/max_load_ratio": 3.0}, details=details)
    mp.close()

    assert metrics["moe/layer2/max_load_ratio"] == 3.0 and metrics["moe/max_load_ratio"] == 3.0
    (line,) = plait_log.messages
    assert line.endswith("moe/max_load_ratio 3") and "layer" not in line
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"moe/max_load_ratio", *details} <= set(events.Tags()["scalars"])
    with pytest.raises(ValueError, match="collides"):
        record(make_processor(tmp_path / "again"), 1, extra={"a": 1.0}, details={"a": 2.0})


def test_non_logging_rank_prints_and_writes_nothing(tmp_path: Path, plait_log) -> None:
    terminal = FakeTerminal()
    config = MetricsSection(progress="on")
    mp = make_processor(tmp_path, config=config, is_logging_rank=False, progress_stream=terminal)
    metrics = record(mp, 10)
    mp.log_text("hello")
    mp.close()
    assert metrics["tps"] == 4096 / 0.5
    assert plait_log.messages == []
    assert terminal.getvalue() == ""
    assert not (tmp_path / "tb").exists()


def test_progress_line_redraws_in_place_with_rate_and_eta(tmp_path: Path, plait_log) -> None:
    terminal, clock = FakeTerminal(), FakeClock()
    config = MetricsSection(log_freq=100, enable_tensorboard=False, progress="auto")
    mp = make_processor(tmp_path, config=config, total_steps=200, progress_stream=terminal, clock=clock)

    record(mp, 1, seconds=4.0)  # the first step seen is left out of the rate: none yet
    assert terminal.getvalue().startswith(ERASE_LINE) and ANSI.search(terminal.getvalue()[len(ERASE_LINE) :])
    assert screen(terminal.getvalue()) == ["step   1/200    0%  ? steps/s  ETA -:--:--"]
    for step in range(2, 6):
        clock.now += 0.5
        record(mp, step, seconds=0.5)
    # 4 steps in 2 s after the first one: 2 steps/s, 195 steps left.
    assert screen(terminal.getvalue()) == ["step   5/200    2%  2.00 steps/s  ETA 0:01:38"]
    assert terminal.getvalue().count(ERASE_LINE) == 5

    drawn = len(terminal.getvalue())
    clock.now += 0.05
    record(mp, 6, seconds=0.05)  # within 0.1 s of the last redraw: not drawn
    assert len(terminal.getvalue()) == drawn
    clock.now += 0.5
    mp.log_text("checkpoint saved")  # cleared, logged, drawn again with the newest state
    assert terminal.getvalue()[drawn:].startswith(ERASE_LINE + ERASE_LINE)
    # 5 steps in 2.05 s after the first one, 194 left.
    assert screen(terminal.getvalue()) == ["step   6/200    3%  2.44 steps/s  ETA 0:01:20"]
    assert plait_log.messages == ["checkpoint saved"]

    clock.now += 10.0
    record(mp, 200, seconds=0.5)  # the last step is always logged and drawn
    assert plait_log.messages[-1].startswith("step 200")
    # 199 steps in 12.55 s after the first one.
    assert screen(terminal.getvalue()) == ["step 200/200  100%  15.86 steps/s  ETA 0:00:00"]
    mp.close()
    assert screen(terminal.getvalue()) == ["step 200/200  100%  15.86 steps/s  ETA 0:00:00", ""]


def test_progress_line_is_cropped_to_the_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "24")
    terminal = FakeTerminal()
    mp = make_processor(tmp_path, config=MetricsSection(enable_tensorboard=False, progress="on"),
                        total_steps=200, progress_stream=terminal)  # fmt: skip
    record(mp, 7)
    (shown,) = screen(terminal.getvalue())
    assert len(shown) <= 24 and shown.startswith("step   7/200") and shown.endswith("…")


def test_log_lines_print_above_the_progress_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    terminal, clock = FakeTerminal(), FakeClock()
    config = MetricsSection(log_freq=2, enable_tensorboard=False, progress="on")
    mp = make_processor(tmp_path, config=config, progress_stream=terminal, clock=clock)
    with logging_only_to(terminal):
        for step in range(1, 4):
            clock.now += 1.0
            record(mp, step, seconds=1.0)
            if step == 3:
                logging.getLogger("plait").warning("saving a checkpoint")  # not through the processor
        clock.now += 1.0
        record(mp, 4, seconds=1.0)
        mp.close()
        logging.getLogger("plait").warning("after close")
    assert not re.search(r"\x1b\[[0-9;]*m", terminal.getvalue())  # NO_COLOR: no color codes
    shown = screen(terminal.getvalue())
    assert shown[0].startswith("step  2  loss") and shown[2].startswith("step  4  loss")
    assert shown[1] == "saving a checkpoint"
    assert shown[3:] == ["step  4/10   40%  1.00 steps/s  ETA 0:00:06", "after close", ""]


def test_progress_off_a_terminal_prints_a_line_per_tenth(tmp_path: Path) -> None:
    stream, clock = io.StringIO(), FakeClock()
    config = MetricsSection(log_freq=100, enable_tensorboard=False, progress="on")
    mp = make_processor(tmp_path, config=config, total_steps=25, progress_stream=stream, clock=clock)
    for step in range(1, 26):
        clock.now += 2.0
        record(mp, step, seconds=2.0)
    mp.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()
    assert [int(re.search(r"(\d+)%", line).group(1)) for line in lines] == [
        12, 20, 32, 40, 52, 60, 72, 80, 92, 100
    ]  # fmt: skip
    assert lines[1] == "progress step  5/25   20%  2.00 s/step  ETA 0:00:40"

    auto = make_processor(
        tmp_path,
        config=MetricsSection(enable_tensorboard=False, progress="auto"),
        progress_stream=io.StringIO(),
    )
    assert auto.progress is None


def test_summary_leaves_out_the_warmup_steps(tmp_path: Path) -> None:
    mp = make_processor(tmp_path, num_devices=2, flops_per_token=2e9, peak_flops=1e13, total_steps=6)
    seconds = [9.0, 3.0, 1.0, 2.0, 1.0]
    tokens = [1000, 1000, 1000, 3000, 2000]
    for step, (s, t) in enumerate(zip(seconds, tokens, strict=True), start=1):
        record(mp, step, seconds=s, tokens=t)
    summary = mp.summary()
    tps = (1000 + 3000 + 2000) / (1.0 + 2.0 + 1.0) / 2
    assert summary["steps"] == 5 and summary["steady_steps"] == 3
    assert summary["first_step_seconds"] == 9.0
    assert summary["step_seconds"] == pytest.approx(4.0 / 3, rel=1e-12)
    assert summary["tps"] == pytest.approx(tps, rel=1e-12)
    assert summary["tflops"] == pytest.approx(2e9 * tps / 1e12, rel=1e-12)
    assert summary["mfu"] == pytest.approx(100 * 2e9 * tps / 1e13, rel=1e-12)
    assert summary["memory/peak_gib"] > 0
    assert mp.summary(warmup=0)["tps"] == pytest.approx(8000 / 16.0 / 2, rel=1e-12)
    empty = mp.summary(warmup=5)
    assert empty["steady_steps"] == 0 and math.isnan(empty["tps"]) and empty["first_step_seconds"] == 9.0


def test_peak_cpu_memory_is_positive_and_monotonic() -> None:
    before = peak_memory_bytes("cpu")
    assert before > 10 * 2**20  # a Python process with torch holds more than 10 MiB
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    during = peak_memory_bytes("cpu")
    del block
    after = peak_memory_bytes("cpu")
    assert before <= during <= after


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="resetting the CPU peak needs Linux")
def test_reset_starts_a_new_cpu_peak_window() -> None:
    block = torch.ones(128 * 2**20 // 4)
    with_block = peak_memory_bytes("cpu")
    del block
    reset_peak_memory("cpu")
    assert peak_memory_bytes("cpu") < with_block - 64 * 2**20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_peak_cuda_memory_tracks_allocations() -> None:
    reset_peak_memory("cuda", memory_stats=True)
    block = torch.empty(32 * 2**20, dtype=torch.uint8, device="cuda")
    assert peak_memory_bytes("cuda", memory_stats=True) >= 32 * 2**20
    del block
    reset_peak_memory("cuda", memory_stats=True)
    assert peak_memory_bytes("cuda", memory_stats=True) < 32 * 2**20


def test_rates_read_well() -> None:
    assert [format_rate(r) for r in (12.345, 1.0, 0.25, math.nan)] == [
        "12.35 steps/s", "1.00 steps/s", "4.00 s/step", "? steps/s"
    ]  # fmt: skip
