"""Step time of every pipeline schedule at pp 2 (two gloo ranks), relative to one process
without a pipeline, measured side by side in one invocation on this machine.

    python benchmarks/pipeline_schedules.py [--flavor debugmodel] [--steps 10] [--warmup 3]

Every run trains the same job (same global batch, one thread per rank); a step's time is
the core's whole optimizer step (forward, backward, clipping, AdamW), timed by an
in-process plugin that wraps ``plait_train_step``. The figure per run is the median
step after the warm-up steps. A pp 1 run comes before the first schedule and after each
one, and every schedule is compared with the mean of the two pp 1 runs around it, so a
change in the machine's load between runs shifts both sides of a ratio alike.

On CPU the pipeline's two ranks get two cores and the single process one, so the ideal
ratio is about 0.5 plus the bubble; the point is to compare schedules with each other.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from plait import hookimpl

SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")


class StepTimer:
    """An in-process plugin: wall time of each optimizer step."""

    PLAIT_API_VERSION = 1
    PROVIDES = ()
    REQUIRES = ()

    def __init__(self) -> None:
        self.seconds: list[float] = []

    @hookimpl(wrapper=True)
    def plait_train_step(self, ctx):  # noqa: ANN001, ANN201 - pluggy wrapper
        started = time.perf_counter()
        result = yield
        self.seconds.append(time.perf_counter() - started)
        return result


def worker(out: str, argv: list[str]) -> None:
    """One rank: train ``argv``; rank 0 writes its step times to ``out``."""
    import torch

    torch.set_num_threads(1)
    from plait.cli import resolve_train_config
    from plait.train import Trainer

    job = resolve_train_config(argv)
    timer = StepTimer()
    job.plugins.register_object(timer, "step_timer")
    trainer = Trainer(job)
    try:
        trainer.train()
    finally:
        trainer.close()
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps(timer.seconds))


def run(world_size: int, argv: list[str], out: Path) -> list[float]:
    from plait.testing import free_port

    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
        }
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(out), "--", *argv], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [proc.communicate()[0] for proc in procs]
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        if proc.returncode != 0:
            raise SystemExit(f"rank {rank} of {argv} exited with {proc.returncode}:\n{output[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="debugmodel", help="llama3 flavor with >= 4 blocks (default: 6 blocks)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--local-batch-size", type=int, default=8, help="also the number of microbatches")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        worker(args.worker, [a for a in rest if a != "--"])
        return
    if args.steps <= args.warmup:
        parser.error("--steps must be larger than --warmup")

    import torch

    with tempfile.TemporaryDirectory() as dump:
        def job(*extra: str) -> list[str]:
            return [
                "--config", "llama3_debugmodel",
                "--model.flavor", args.flavor,
                "--training.steps", str(args.steps),
                "--training.seq_len", str(args.seq_len),
                "--training.local_batch_size", str(args.local_batch_size),
                "--checkpoint.enable", "False",
                "--metrics.enable_tensorboard", "False",
                "--metrics.progress", "off",
                "--metrics.log_freq", str(args.steps),
                "--job.dump_folder", dump,
                *extra,
            ]  # fmt: skip

        def median_step(label: str, world_size: int, argv: list[str]) -> float:
            seconds = run(world_size, argv, Path(dump) / "steps.json")
            median = statistics.median(seconds[args.warmup:])
            print(f"  {label:<24} median step {median * 1000:8.1f} ms", file=sys.stderr, flush=True)
            return median

        print(f"llama3/{args.flavor}, seq_len {args.seq_len}, local batch {args.local_batch_size}, "
              f"{args.steps} steps ({args.warmup} warm-up), {os.cpu_count()} cpus, torch {torch.__version__}",
              file=sys.stderr)
        baselines = [median_step("pp 1", 1, job())]
        pipelined: dict[str, float] = {}
        for schedule in SCHEDULES:
            pp2 = job("--plugins", "pipeline", "--parallelism.pp", "2", "--pipeline.schedule", schedule)
            pipelined[schedule] = median_step(f"pp 2 {schedule}", 2, pp2)
            baselines.append(median_step("pp 1", 1, job()))

    print("\n| schedule (pp 2) | median step (ms) | pp 1 before / after (ms) | relative to pp 1 |")
    print("|---|---|---|---|")
    for index, (schedule, seconds) in enumerate(pipelined.items()):
        before, after = baselines[index], baselines[index + 1]
        ratio = seconds / ((before + after) / 2)
        print(f"| {schedule} | {seconds * 1000:.0f} | {before * 1000:.0f} / {after * 1000:.0f} | {ratio:.2f} |")

if __name__ == "__main__":
    main()
