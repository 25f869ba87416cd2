"""Step profiling: torch profiler traces of chosen steps and CUDA memory snapshots.

``StepProfiler`` is entered around the training loop and told when each step ends. With
``--profiling.enable`` it runs ``torch.profiler`` on the schedule of the ``profiling``
section and writes one trace per rank and profiled window to
``<dump_folder>/<profiling.folder>/`` (``rank<R>.step<N>.pt.trace.json``, N the window's
last step: Chrome trace
format, opened by https://ui.perfetto.dev and TensorBoard's profiler plugin).

Memory snapshots (``--profiling.memory_snapshot``) record CUDA allocator history and
dump ``memory_snapshot/rank<R>_step<N>.pickle`` (open it at
https://pytorch.org/memory_viz) at the end of each profiled window and when a step runs
out of memory. On CPU torch keeps no allocator history; the trace's memory events
(``profile_memory``) are what it offers there.

The data loader's wait and the host-device synchronisation of each step are marked as
``plait.data_wait`` and ``plait.sync`` ranges in the trace, and their times go to the
step's metrics either way.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from plait.config import ProfilingSection

logger = logging.getLogger("plait")

MEMORY_HISTORY_ENTRIES = 100_000


class StepTimes:
    """Seconds of the current step spent waiting for data and for the device."""

    def __init__(self) -> None:
        self.data_wait = 0.0
        self.sync = 0.0

    def reset(self) -> None:
        self.data_wait = self.sync = 0.0

    @contextmanager
    def waiting_for_data(self) -> Iterator[None]:
        started = time.perf_counter()
        with torch.profiler.record_function("plait.data_wait"):
            yield
        self.data_wait += time.perf_counter() - started

    @contextmanager
    def syncing(self) -> Iterator[None]:
        started = time.perf_counter()
        with torch.profiler.record_function("plait.sync"):
            yield
        self.sync += time.perf_counter() - started

    def as_metrics(self) -> dict[str, float]:
        """What goes to TensorBoard only (the data wait is a metric of its own, on the console too)."""
        return {"time/sync_ms": 1e3 * self.sync}


class StepProfiler:
    """The profiler of a run (a no-op unless ``section.enable``)."""

    def __init__(self, section: ProfilingSection, *, dump_folder: str, rank: int, device_type: str,
                 first_step: int, memory_stats: bool = False) -> None:
        self.section = section
        self.rank = rank
        self.device_type = device_type
        self.folder = os.path.join(dump_folder, section.folder)
        self._profiler: torch.profiler.profile | None = None
        self._step = first_step - 1
        # the caching allocator's history: CUDA and HIP devices (the memory_stats capability)
        self._cuda_memory = section.memory_snapshot and memory_stats

    def __enter__(self) -> StepProfiler:
        section = self.section
        if not section.enable:
            return self
        os.makedirs(self.folder, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device_type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profiler = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(
                skip_first=section.skip_steps, wait=section.wait_steps, warmup=section.warmup_steps,
                active=section.active_steps, repeat=section.repeat,
            ),
            on_trace_ready=self._trace_ready,
            record_shapes=section.record_shapes,
            profile_memory=section.profile_memory,
            with_stack=section.with_stack,
        )
        if self._cuda_memory:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
        self._profiler.__enter__()
        return self

    def step_done(self, step: int) -> None:
        self._step = step
        if self._profiler is not None:
            self._profiler.step()

    def out_of_memory(self, step: int) -> str:
        """Dump a snapshot for an out-of-memory error at ``step``; where it went, for the message."""
        if not self._cuda_memory:
            return ""
        return f"; memory snapshot: {self._dump_memory_snapshot(step)}"

    def __exit__(self, *exc: Any) -> None:
        if self._profiler is None:
            return
        self._profiler.__exit__(*exc)
        self._profiler = None
        if self._cuda_memory:
            torch.cuda.memory._record_memory_history(enabled=None)

    def _trace_ready(self, profiler: torch.profiler.profile) -> None:
        path = os.path.join(self.folder, f"rank{self.rank}.step{self._step}.pt.trace.json")
        profiler.export_chrome_trace(path)
        logger.info("profiler trace of rank %d (window ending at step %d) written to %s", self.rank, self._step, path)
        if self._cuda_memory:
            self._dump_memory_snapshot(self._step)

    def _dump_memory_snapshot(self, step: int) -> str:
        folder = os.path.join(self.folder, "memory_snapshot")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"rank{self.rank}_step{step}.pickle")
        torch.cuda.memory._dump_snapshot(path)
        return path
