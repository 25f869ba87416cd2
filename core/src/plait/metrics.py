"""Training metrics: one console line per logged step, TensorBoard scalars, a progress
line with ETA, and a steady-state summary for benchmark scripts.

Terminal output goes through ``rich``: the colors of the step line, and the progress
line's speed estimate, ETA, width cropping and in-place redraw.

Throughput is reported per device and per step: ``tps`` is the tokens the whole job
consumed in the step divided by the step's seconds and by the number of devices, so a
slow first step (compilation, warm-up) shows as slow instead of being averaged away.
``summary()`` gives the steady-state averages with the first steps left out.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from array import array
from collections.abc import Callable
from typing import Any, TextIO

from rich.color import ColorSystem
from rich.console import Console
from rich.control import Control, ControlType
from rich.progress import (
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TimeRemainingColumn,
)
from rich.style import Style
from rich.text import Text

from plait.config import MetricsSection

logger = logging.getLogger("plait")

GIB = 2**30

#: Scalar names in TensorBoard for the keys of ``record_step``'s result; extra keys keep their name.
TENSORBOARD_NAMES = {
    "loss": "loss",
    "grad_norm": "grad_norm",
    "lr": "lr",
    "tps": "throughput/tps",
    "tflops": "throughput/tflops",
    "mfu": "throughput/mfu",
    "memory/peak_gib": "memory/peak_gib",
    "step_seconds": "time/step_seconds",
    "time/data_wait_ms": "time/data_wait_ms",
    "tokens_seen": "progress/tokens_seen",
}

#: Go to column 0 and erase the line: where a progress line is redrawn or hidden.
_ERASE_LINE = Control(ControlType.CARRIAGE_RETURN, (ControlType.ERASE_IN_LINE, 2))

#: rich styles of the step line's fields (rendered only when the logger prints to a terminal).
_STYLES = {"step": "bold", "loss": "cyan", "grad_norm": "yellow", "tps": "green", "mfu": "magenta", "mem": "blue"}


# ---------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------


def peak_memory_bytes(device_type: str, *, memory_stats: bool = False) -> int:
    """Peak memory of this process on ``device_type`` since start or the last reset.

    cpu: peak resident set size of the process; a device with the ``memory_stats``
    capability (CUDA and HIP builds of torch): peak bytes allocated by the caching
    allocator; other accelerators through ``torch.accelerator``. Returns 0 where the
    platform cannot report it.
    """
    if device_type == "cpu":
        try:
            import resource
        except ImportError:  # Windows
            return 0
        max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(max_rss if sys.platform == "darwin" else max_rss * 1024)
    import torch

    if memory_stats:
        return int(torch.cuda.max_memory_allocated())
    if _accelerator_is(device_type):
        return int(torch.accelerator.max_memory_allocated())
    return 0


def reset_peak_memory(device_type: str, *, memory_stats: bool = False) -> None:
    """Start a new peak-memory window for ``peak_memory_bytes``.

    On CPU this needs Linux (``/proc/self/clear_refs``); elsewhere the CPU peak stays
    the peak since the process started.
    """
    if device_type == "cpu":
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # 5 = reset the peak resident set size
        except OSError:
            pass
        return
    import torch

    if memory_stats:
        torch.cuda.reset_peak_memory_stats()
    elif _accelerator_is(device_type):
        torch.accelerator.reset_peak_memory_stats()


def _accelerator_is(device_type: str) -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is None or not accelerator.is_available():
        return False
    current = accelerator.current_accelerator()
    return current is not None and current.type == device_type


# ---------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------


def format_rate(steps_per_second: float) -> str:
    """Steps per second, or seconds per step when a step takes longer than a second."""
    if not math.isfinite(steps_per_second) or steps_per_second <= 0:
        return "? steps/s"
    if steps_per_second >= 1:
        return f"{steps_per_second:.2f} steps/s"
    return f"{1 / steps_per_second:.2f} s/step"


def format_count(value: float) -> str:
    """A count in 4 significant digits with a K/M/B/T suffix: ``12.35M``."""
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.4g}{suffix}"
    return f"{value:.0f}"


def format_step_line(step: int, metrics: dict[str, float], *, step_width: int, color: bool) -> str:
    """The console line of one step: fixed-width fields so that consecutive lines align."""

    def paint(text: str, field: str) -> str:
        return Style.parse(_STYLES[field]).render(text, color_system=ColorSystem.STANDARD) if color else text

    loss, grad_norm, tps = metrics["loss"], metrics["grad_norm"], metrics["tps"]
    fields = [
        "step " + paint(f"{step:>{step_width}d}", "step"),
        "loss " + paint(f"{loss:7.4f}", "loss"),
        "grad_norm " + paint(f"{grad_norm:6.3f}", "grad_norm"),
        f"lr {metrics['lr']:.2e}",
        "tps " + paint(f"{tps:>9,.0f}", "tps"),
        f"tflops {metrics['tflops']:6.2f}",
    ]
    if "mfu" in metrics:
        fields.append("mfu " + paint(f"{metrics['mfu']:5.2f}%", "mfu"))
    fields.append("mem " + paint(f"{metrics['memory/peak_gib']:5.2f}GiB", "mem"))
    fields.append(f"time {metrics['step_seconds']:6.3f}s")
    if "time/data_wait_ms" in metrics:
        fields.append(f"data {metrics['time/data_wait_ms']:5.1f}ms")
    if "tokens_seen" in metrics:
        fields.append(f"seen {format_count(metrics['tokens_seen']):>6}")
    fields.extend(f"{key} {value:.4g}" for key, value in metrics.items() if key not in TENSORBOARD_NAMES)
    return "  ".join(fields)


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty is not None and isatty())
    except ValueError:  # closed stream
        return False


def _logger_writes_to_terminal(log: logging.Logger) -> bool:
    """True when every handler that would print ``log``'s records writes to a terminal."""
    if os.environ.get("NO_COLOR"):
        return False
    found_handler = False
    current: logging.Logger | None = log
    while current is not None:
        for handler in current.handlers:
            found_handler = True
            if isinstance(handler, logging.FileHandler) or not isinstance(handler, logging.StreamHandler):
                return False
            if not _is_terminal(handler.stream):
                return False
        if not current.propagate:
            break
        current = current.parent
    # Without handlers, logging's last resort prints to stderr.
    return found_handler or _is_terminal(sys.stderr)


# ---------------------------------------------------------------------------
# Progress line
# ---------------------------------------------------------------------------


class ProgressLine:
    """Step/total, percent, rate and ETA for long runs, drawn by ``rich``.

    On a terminal it is one line redrawn in place, cropped to the terminal's width, at
    most every ``min_redraw_seconds``; ``hide()`` clears it so that a log line prints
    above it, and the next ``update()`` or ``show()`` draws it again. On any other
    stream it prints a plain line each time the run passes another tenth of its steps.

    The rate and ETA are rich's estimate: wall time over the steps of the last
    ``speed_estimate_seconds``, leaving out the first step seen (which is usually slow),
    so pauses for checkpoints and validation in that window are in the ETA.
    """

    def __init__(
        self,
        *,
        total_steps: int,
        stream: TextIO,
        clock: Callable[[], float] = time.monotonic,
        min_redraw_seconds: float = 0.1,
        speed_estimate_seconds: float = 300.0,
    ) -> None:
        self.total_steps = total_steps
        self.stream = stream
        self.console = Console(file=stream, highlight=False, markup=False, emoji=False)
        self.interactive = self.console.is_terminal
        self._clock = clock
        self._min_redraw_seconds = min_redraw_seconds
        # Used as the model of the task (samples, speed, ETA) and its columns; never
        # started, so rich draws no live display of its own and redirects no stream.
        self._progress = Progress(
            MofNCompleteColumn(),
            TaskProgressColumn(),
            RateColumn(),
            TimeRemainingColumn(),
            console=self.console,
            auto_refresh=False,
            speed_estimate_period=speed_estimate_seconds,
            redirect_stdout=False,
            redirect_stderr=False,
            get_time=clock,
        )
        self._task = self._progress.add_task("train", total=total_steps, completed=0)
        self._started = False
        self._visible = False
        self._last_draw = -math.inf
        self._next_tenth = 1

    def update(self, step: int, *, step_seconds: float) -> None:
        # rich's speed leaves out the steps of its first sample: the first step seen.
        self._progress.update(self._task, completed=step)
        self._started = True
        now = self._clock()
        if self.interactive:
            due = now - self._last_draw >= self._min_redraw_seconds
            if due or not self._visible or step >= self.total_steps:
                self._draw(now)
        elif step * 10 >= self._next_tenth * self.total_steps:
            self.console.print("progress " + self.text().plain, soft_wrap=True)
            self._next_tenth = step * 10 // self.total_steps + 1

    def text(self) -> Text:
        """The current line, as the columns render it: ``step  5/200    2%  2.00 steps/s  ETA 0:01:38``."""
        task = self._progress.tasks[0]
        columns = zip(("step ", "  ", "  ", "  ETA "), self._progress.columns, strict=True)
        parts = (part for label, column in columns for part in (label, column(task)))
        return Text.assemble(*parts)  # type: ignore[arg-type]

    def hide(self) -> None:
        if self._visible:
            self.console.control(_ERASE_LINE)
            self._visible = False

    def show(self) -> None:
        if self.interactive and self._started and not self._visible:
            self._draw(self._clock())

    def close(self) -> None:
        """Leave the last state on its own line."""
        if self._visible:
            self.console.line()
            self._visible = False
        self._started = False

    def _draw(self, now: float) -> None:
        self.console.control(_ERASE_LINE)
        self.console.print(self.text(), end="", no_wrap=True, overflow="ellipsis")
        self._visible = True
        self._last_draw = now


class RateColumn(ProgressColumn):
    """Steps per second (seconds per step when slower) from rich's speed estimate."""

    def render(self, task: Task) -> Text:
        return Text(format_rate(math.nan if task.speed is None else task.speed), style="progress.data.speed")


def _flatten(document: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in document.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (list, tuple)):
            flat[f"{prefix}{key}"] = ",".join(map(str, value))
        elif value is not None:
            flat[f"{prefix}{key}"] = value
    return flat


# ---------------------------------------------------------------------------
# Metrics processor
# ---------------------------------------------------------------------------


class MetricsProcessor:
    """Turns the numbers of each optimizer step into metrics, logs and charts them.

    ``tokens`` given to ``record_step`` are the tokens the whole job consumed in the
    step (all data-parallel ranks); ``num_devices`` is the number of devices in the
    job, so ``tps`` is per device. ``peak_flops`` is one device's peak FLOP/s; 0 or
    less means unknown and leaves ``mfu`` out. Only the logging rank prints, draws
    the progress line and writes TensorBoard events; every rank gets the metrics.
    """

    def __init__(
        self,
        config: MetricsSection,
        *,
        dump_folder: str,
        total_steps: int,
        flops_per_token: float,
        peak_flops: float,
        device_type: str,
        memory_stats: bool = False,
        is_logging_rank: bool = True,
        num_devices: int = 1,
        progress_stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        config.validate()
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        if num_devices <= 0:
            raise ValueError(f"num_devices must be positive, got {num_devices}")
        self.config = config
        self.total_steps = total_steps
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.device_type = device_type
        self.memory_stats = memory_stats
        self.is_logging_rank = is_logging_rank
        self.num_devices = num_devices
        self.tensorboard_dir = os.path.join(dump_folder, config.tensorboard_folder)
        self._step_width = len(str(total_steps))
        self._tokens = array("d")
        self._seconds = array("d")
        self._peak_gib = 0.0
        self._writer = self._open_tensorboard() if is_logging_rank and config.enable_tensorboard else None
        self.progress = self._open_progress(progress_stream, clock) if is_logging_rank else None

    def _open_tensorboard(self) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=self.tensorboard_dir)

    def _open_progress(self, stream: TextIO | None, clock: Callable[[], float]) -> ProgressLine | None:
        stream = sys.stderr if stream is None else stream
        mode = self.config.progress
        if mode == "off":
            return None
        progress = ProgressLine(total_steps=self.total_steps, stream=stream, clock=clock)
        if mode == "auto" and not progress.interactive:  # rich decides what a terminal is (FORCE_COLOR, ...)
            return None
        if progress.interactive:
            # Any record of the plait logger clears the line first; the next step redraws it.
            logger.addFilter(self._clear_progress_before_log)
        return progress

    def _clear_progress_before_log(self, record: logging.LogRecord) -> bool:
        if self.progress is not None:
            self.progress.hide()
        return True

    def record_step(
        self,
        step: int,
        *,
        loss: float,
        grad_norm: float,
        lr: float,
        tokens: int,
        seconds: float,
        extra: dict[str, float] | None = None,
        details: dict[str, float] | None = None,
        tokens_seen: int | None = None,
        data_wait_seconds: float | None = None,
    ) -> dict[str, float]:
        """Metrics of optimizer step ``step`` (1-based); logged every ``log_freq`` steps and at the last.

        ``tokens_seen``: tokens trained on so far by the whole job (this step included);
        ``data_wait_seconds``: time this rank waited for the data loader in the step.

        ``extra`` scalars go to the console line and TensorBoard, ``details`` (breakdowns
        too long for one line, e.g. per layer) to TensorBoard only; both are returned.
        """
        if seconds <= 0:
            raise ValueError(f"step {step}: seconds must be positive, got {seconds}")
        tps = tokens / seconds / self.num_devices
        peak_gib = peak_memory_bytes(self.device_type, memory_stats=self.memory_stats) / GIB
        metrics = {
            "loss": float(loss),
            "grad_norm": float(grad_norm),
            "lr": float(lr),
            "tps": tps,
            "tflops": self.flops_per_token * tps / 1e12,
        }
        if self.peak_flops > 0:
            metrics["mfu"] = 100 * self.flops_per_token * tps / self.peak_flops
        metrics["memory/peak_gib"] = peak_gib
        metrics["step_seconds"] = float(seconds)
        if data_wait_seconds is not None:
            metrics["time/data_wait_ms"] = 1e3 * data_wait_seconds
        if tokens_seen is not None:
            metrics["tokens_seen"] = float(tokens_seen)
        for key, value in [*(extra or {}).items(), *(details or {}).items()]:
            if key in metrics:
                raise ValueError(f"extra metric {key!r} collides with a built-in or another extra metric; rename it")
            metrics[key] = float(value)

        self._tokens.append(float(tokens))
        self._seconds.append(float(seconds))
        self._peak_gib = max(self._peak_gib, peak_gib)

        if self.is_logging_rank and (step % self.config.log_freq == 0 or step == self.total_steps):
            color = _logger_writes_to_terminal(logger)
            # Printed above the progress line, which the update below draws again.
            console = {key: value for key, value in metrics.items() if key not in (details or {})}
            logger.info(format_step_line(step, console, step_width=self._step_width, color=color))
            if self._writer is not None:
                for key, value in metrics.items():
                    self._writer.add_scalar(TENSORBOARD_NAMES.get(key, key), value, global_step=step)
                self._writer.flush()
        if self.progress is not None:
            self.progress.update(step, step_seconds=seconds)
        return metrics

    def record_scalars(self, step: int, values: dict[str, float], *, console: str) -> None:
        """Scalars outside the step's own (validation): the ``console`` line, then every
        value to TensorBoard under its name (logging rank only)."""
        if not self.is_logging_rank:
            return
        self.log_text(console)
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(key, value, global_step=step)
            self._writer.flush()

    def record_run(self, step: int, *, config: dict[str, Any], batch: dict[str, int]) -> None:
        """Once at the start of a run (logging rank only): the batch in one console line, and
        to TensorBoard the batch as scalars, the config as text and as hparams (flattened
        ``section.field`` values, for comparing runs in TensorBoard's HParams tab)."""
        if not self.is_logging_rank:
            return
        self.log_text(
            f"global batch {batch['global_sequences']:,} sequences = {batch['global_tokens']:,} tokens per step "
            f"(local {batch['local_sequences']} × data-parallel {batch['dp_degree']} × accumulation "
            f"{batch['accumulation_steps']})"
        )
        if self._writer is None:
            return
        for key, value in batch.items():
            self._writer.add_scalar(f"batch/{key}", value, global_step=step)
        self._writer.add_text("config", "```json\n" + json.dumps(config, indent=2, default=str) + "\n```", global_step=step)
        from torch.utils.tensorboard.summary import hparams

        flat = {key: value for key, value in _flatten(config).items() if isinstance(value, (bool, int, float, str))}
        for summary in hparams(flat, {"loss": math.nan}):
            self._writer.file_writer.add_summary(summary, global_step=step)
        self._writer.flush()

    def record_text(self, step: int, tag: str, text: str) -> None:
        """A text (e.g. generated samples) to TensorBoard under ``tag`` (logging rank only)."""
        if self.is_logging_rank and self._writer is not None:
            self._writer.add_text(tag, text, global_step=step)
            self._writer.flush()

    def record_image(self, step: int, tag: str, image: Any) -> None:
        """An RGB ``uint8 [height, width, 3]`` image to TensorBoard under ``tag`` (logging rank only)."""
        if self.is_logging_rank and self._writer is not None:
            self._writer.add_image(tag, image.numpy(), global_step=step, dataformats="HWC")
            self._writer.flush()

    def log_text(self, msg: str, *, level: int = logging.INFO) -> None:
        """A message through the console logger, printed above the progress line (logging rank only)."""
        if self.is_logging_rank:
            logger.log(level, msg)
            if self.progress is not None:
                self.progress.show()

    def summary(self, warmup: int = 2) -> dict[str, float]:
        """Steady-state averages over the recorded steps after the first ``warmup`` ones.

        ``tps`` is total tokens over total seconds of those steps, per device; means are
        NaN when no step is left after the warm-up.
        """
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        steady_tokens = sum(self._tokens[warmup:])
        steady_seconds = sum(self._seconds[warmup:])
        steady_steps = max(0, len(self._seconds) - warmup)
        tps = steady_tokens / steady_seconds / self.num_devices if steady_steps else math.nan
        result = {
            "steps": float(len(self._seconds)),
            "steady_steps": float(steady_steps),
            "first_step_seconds": self._seconds[0] if self._seconds else math.nan,
            "step_seconds": steady_seconds / steady_steps if steady_steps else math.nan,
            "tps": tps,
            "tflops": self.flops_per_token * tps / 1e12,
        }
        if self.peak_flops > 0:
            result["mfu"] = 100 * self.flops_per_token * tps / self.peak_flops
        result["memory/peak_gib"] = self._peak_gib
        return result

    def close(self) -> None:
        """Flush and close the TensorBoard writer and finish the progress line. Safe to repeat."""
        if self.progress is not None:
            self.progress.close()
            logger.removeFilter(self._clear_progress_before_log)
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsProcessor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
