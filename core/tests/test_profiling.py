"""Profiler traces of chosen steps, and the step's data-wait and sync times."""
from __future__ import annotations

import json

import pytest
import torch

from plait import hookimpl
from plait.config import ProfilingSection
from plait.errors import ConfigError

from toy_model import ToyModelPlugin, toy_config, train_toy


def test_traces_hold_the_profiled_steps_one_file_per_window(tmp_path):
    config = toy_config(tmp_path, steps=6)
    config.profiling = ProfilingSection(enable=True, skip_steps=1, warmup_steps=1, active_steps=2, repeat=1)
    trainer, result = train_toy(config, ToyModelPlugin())
    assert sorted(result.losses) == [1, 2, 3, 4, 5, 6]
    traces = sorted((tmp_path / "profiles").glob("*.pt.trace.json"))
    assert [trace.name for trace in traces] == ["rank0.step4.pt.trace.json"]  # skip 1, warm up 1, record 3-4
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {event.get("name", "") for event in events}
    assert {"ProfilerStep#2", "ProfilerStep#3"} <= names  # the profiler counts steps from 0
    assert "ProfilerStep#4" not in names and "ProfilerStep#1" not in names
    assert {"plait.data_wait", "plait.sync"} <= names
    assert any(name.startswith("aten::mm") or name == "aten::addmm" for name in names)


def test_without_profiling_nothing_is_written(tmp_path):
    train_toy(toy_config(tmp_path, steps=2), ToyModelPlugin())
    assert not (tmp_path / "profiles").exists()


class MetricsCollector:
    PLAIT_API_VERSION = 1

    def __init__(self) -> None:
        self.logged: dict[int, dict[str, float]] = {}

    @hookimpl
    def plait_log_metrics(self, step, metrics, config):
        self.logged[step] = dict(metrics)


def test_data_wait_step_time_and_tokens_seen_reach_the_metrics(tmp_path):
    collector = MetricsCollector()
    config = toy_config(tmp_path, steps=2)
    config.metrics.log_freq = 1
    train_toy(config, ToyModelPlugin(), collector)
    first, second = collector.logged[1], collector.logged[2]
    assert first["time/data_wait_ms"] > 0 and first["time/sync_ms"] >= 0 and first["step_seconds"] > 0
    per_step = config.training.local_batch_size * config.training.seq_len
    assert (first["tokens_seen"], second["tokens_seen"]) == (per_step, 2 * per_step)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("active_steps", 0, "--profiling.active_steps must be >= 1"),
    ("warmup_steps", -1, "--profiling.warmup_steps must be >= 0"),
])
def test_bad_schedules_are_refused(field, value, message):
    with pytest.raises(ConfigError, match=message):
        ProfilingSection(**{field: value}).validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA memory snapshots need a CUDA device")
def test_cuda_memory_snapshot_after_the_window(tmp_path):
    config = toy_config(tmp_path, steps=4)
    config.profiling = ProfilingSection(enable=True, memory_snapshot=True, skip_steps=0, warmup_steps=1, active_steps=1)
    train_toy(config, ToyModelPlugin())
    assert list((tmp_path / "profiles" / "memory_snapshot").glob("rank0_step*.pickle"))
