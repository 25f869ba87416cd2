"""Fault tolerance against a checkpoint restart, and its cost per step, side by side in one run.

    python benchmarks/torchft_recovery.py [--config llama3_debugmodel] [--steps 30] [--interval 10]
        [--local-batch-size 2] [-- extra plait options]

Every job has two data-parallel replicas of one rank each (gloo), the same model and the
same global batch:

- **plain HSDP**: one job, ``--parallelism.dp_replicate 2``;
- **torchft**: two replica groups of one rank (``--plugins fsdp,torchft``) and a lighthouse
  in this process.

Steady state: each runs ``--steps`` steps without checkpoints; the median step time
after the first five. Recovery, with a checkpoint every ``--interval`` steps: the plain
job is killed halfway between two checkpoints and restarted whole (it resumes from the
last checkpoint and redoes the steps since); one torchft group is killed at the same
step and restarted (the other trains on; the restarted one resumes from the run's
checkpoint and heals from its peer). Recovery time: from the restart to the restarted
job's (group's) first finished step, plus for the plain job the steps it must redo.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from plait import hookimpl


class StepClock:
    """Appends each finished step's wall time to a JSON-lines file (rank 0 of a job)."""

    PLAIT_API_VERSION = 1

    def __init__(self, path: str) -> None:
        self.path = path

    @hookimpl
    def plait_log_metrics(self, step, metrics, config):  # noqa: ANN001
        if "loss" in metrics:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "time": time.time()}) + "\n")


def child(clock_path: str, argv: list[str]) -> None:
    """One rank of a job, its steps clocked."""
    import torch

    torch.set_num_threads(1)
    from plait.cli import exit_process
    from plait.cli.config_parsing import resolve_train_config
    from plait.train import Trainer

    job = resolve_train_config(argv)
    job.plugins.register_object(StepClock(clock_path), "step_clock")
    trainer = Trainer(job)
    try:
        trainer.train()
    finally:
        trainer.close()
    exit_process(0)


def launch(ranks: int, argv: list[str], clock: Path, log: Path) -> list[subprocess.Popen]:
    from plait.testing import free_port

    port = str(free_port())
    procs = []
    for rank in range(ranks):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks), "LOCAL_WORLD_SIZE": str(ranks)}
        with open(f"{log}.rank{rank}", "a") as handle:
            procs.append(subprocess.Popen([sys.executable, __file__, "--child", str(clock), "--", *argv],
                                          env=env, stdout=handle, stderr=subprocess.STDOUT))
    return procs


def steps_of(clock: Path, *, after: float = 0.0) -> list[dict]:
    if not clock.exists():
        return []
    return [e for e in map(json.loads, clock.read_text().splitlines()) if e["time"] > after]


def wait_for_step(clock: Path, step: int, *, after: float = 0.0, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [e for e in steps_of(clock, after=after) if e["step"] >= step]
        if done:
            return done[0]
        time.sleep(0.02)
    raise SystemExit(f"no step {step} in {clock} within {timeout:g} s; see the logs next to it")


def finish(procs: list[subprocess.Popen], timeout: float = 600) -> None:
    for proc in procs:
        if proc.wait(timeout=timeout) != 0:
            raise SystemExit(f"a rank failed (exit {proc.returncode}); see the logs in {os.path.dirname(proc.args[3])}")


def kill(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
    for proc in procs:
        proc.wait()


def median_step_seconds(clock: Path, skip: int = 5) -> float:
    times = [e["time"] for e in steps_of(clock)][skip:]
    return statistics.median(b - a for a, b in zip(times, times[1:]))


FT_TIMEOUTS = ["--torchft.heartbeat_interval_ms", "100", "--torchft.connect_timeout_seconds", "5",
               "--torchft.timeout_seconds", "30", "--torchft.quorum_timeout_seconds", "120",
               "--job.pg_timeout_seconds", "300"]  # fmt: skip


class Bench:
    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args, self.folder = args, folder
        self.base = ["--config", args.config, "--metrics.progress", "off", "--metrics.log_freq", "1",
                     "--lr_scheduler.warmup_steps", "0", "--training.local_batch_size", str(args.local_batch_size),
                     *args.extra]  # fmt: skip

    def plain(self, name: str, steps: int, checkpoint: list[str]) -> list[str]:
        return [*self.base, "--plugins", "fsdp", "--parallelism.dp_replicate", "2", "--training.steps", str(steps),
                "--job.dump_folder", str(self.folder / name), *checkpoint]

    def torchft(self, name: str, steps: int, checkpoint: list[str], lighthouse, group: int, min_replicas: int):
        return [*self.base, "--plugins", "fsdp,torchft", "--training.steps", str(steps),
                "--job.dump_folder", str(self.folder / name), *checkpoint, *FT_TIMEOUTS,
                "--torchft.lighthouse", lighthouse.address(), "--torchft.replica_groups", "2",
                "--torchft.replica_group", str(group), "--torchft.min_replicas", str(min_replicas)]

    # ---------------------------------------------------------------- steady state

    def steady_plain(self) -> float:
        clock = self.folder / "steady-plain.jsonl"
        finish(launch(2, self.plain("steady-plain", self.args.steps, ["--checkpoint.enable", "False"]), clock,
                      self.folder / "steady-plain.log"))
        return median_step_seconds(clock)

    def steady_torchft(self) -> float:
        from torchft._torchft import LighthouseServer

        lighthouse = LighthouseServer(bind="127.0.0.1:0", min_replicas=2, join_timeout_ms=10000, quorum_tick_ms=20,
                                      heartbeat_timeout_ms=2000)
        clocks = [self.folder / f"steady-ft{g}.jsonl" for g in (0, 1)]
        try:
            groups = [launch(1, self.torchft("steady-ft", self.args.steps, ["--checkpoint.enable", "False"],
                                             lighthouse, g, 2), clocks[g], self.folder / f"steady-ft{g}.log")
                      for g in (0, 1)]
            for procs in groups:
                finish(procs)
        finally:
            lighthouse.shutdown()
        return max(median_step_seconds(clock) for clock in clocks)

    # ---------------------------------------------------------------- recovery

    def checkpoint_restart(self) -> dict[str, float]:
        interval = self.args.interval
        kill_at = 2 * interval + interval // 2
        checkpoint = ["--checkpoint.interval", str(interval)]
        argv = self.plain("restart-plain", 10 * interval, checkpoint)
        clock, log = self.folder / "restart-plain.jsonl", self.folder / "restart-plain.log"
        procs = launch(2, argv, clock, log)
        wait_for_step(clock, kill_at)
        kill(procs)
        restarted = time.time()
        procs = launch(2, argv, clock, log)
        first = wait_for_step(clock, 0, after=restarted)
        caught_up = wait_for_step(clock, kill_at + 1, after=restarted)
        kill(procs)
        return {"first_step": first["time"] - restarted, "resumed_at": first["step"],
                "back_past_the_kill": caught_up["time"] - restarted, "redone": kill_at - first["step"] + 1}

    def replica_group_restart(self) -> dict[str, float]:
        from torchft._torchft import LighthouseServer

        interval = self.args.interval
        kill_at = 2 * interval + interval // 2
        lighthouse = LighthouseServer(bind="127.0.0.1:0", min_replicas=1, join_timeout_ms=10000, quorum_tick_ms=20,
                                      heartbeat_timeout_ms=2000)
        checkpoint = ["--checkpoint.interval", str(interval)]
        argvs = [self.torchft("restart-ft", 100 * interval, checkpoint, lighthouse, g, 1) for g in (0, 1)]
        clocks = [self.folder / f"restart-ft{g}.jsonl" for g in (0, 1)]
        logs = [self.folder / f"restart-ft{g}.log" for g in (0, 1)]
        groups = [launch(1, argvs[g], clocks[g], logs[g]) for g in (0, 1)]
        try:
            wait_for_step(clocks[1], kill_at)
            kill(groups[1])
            killed = time.time()
            wait_for_step(clocks[0], 0, after=killed)
            restarted = time.time()
            groups[1] = launch(1, argvs[1], clocks[1], logs[1])
            first = wait_for_step(clocks[1], 0, after=restarted)
            survivor_times = [e["time"] for e in steps_of(clocks[0], after=killed - 5)]
            pause = max(b - a for a, b in zip(survivor_times, survivor_times[1:]))
        finally:
            for procs in groups:
                kill(procs)
            lighthouse.shutdown()
        return {"first_step": first["time"] - restarted, "resumed_at": first["step"], "survivor_pause": pause}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[sys.argv.index("--") + 1:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="llama3_debugmodel")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--local-batch-size", type=int, default=2, help="sequences per replica and step")
    parser.add_argument("extra", nargs="*", help="more plait train options, after --")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="torchft_recovery_")  # kept on a failure, for its logs
    bench = Bench(args, Path(tmp))
    plain, ft = bench.steady_plain(), bench.steady_torchft()
    restart = bench.checkpoint_restart()
    heal = bench.replica_group_restart()
    shutil.rmtree(tmp)
    rows = [
        ("steady state, s/step", f"{plain:.3f}", f"{ft:.3f} ({(ft / plain - 1) * 100:+.0f}%)"),
        ("restart to first finished step, s", f"{restart['first_step']:.2f}", f"{heal['first_step']:.2f}"),
        ("steps redone after the restart", f"{restart['redone']:.0f}", "0"),
        ("restart to back at the killed step, s", f"{restart['back_past_the_kill']:.2f}",
         f"{heal['first_step']:.2f} (heals at the peer's step)"),
        ("other replicas' longest pause, s", "— (all restart)", f"{heal['survivor_pause']:.2f}"),
    ]
    print(f"\n{args.config}, 2 replicas x 1 rank (gloo), checkpoint every {args.interval} steps, "
          f"{args.local_batch_size} sequences per replica and step, killed at step {2 * args.interval + args.interval // 2}")
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  {'plain HSDP (checkpoint restart)':>32}  {'torchft (group heals)':>32}")
    for label, a, b in rows:
        print(f"{label:{width}}  {a:>32}  {b:>32}")
    print(json.dumps({"plain_step_s": plain, "torchft_step_s": ft, "checkpoint_restart": restart,
                      "replica_group_restart": heal}))


if __name__ == "__main__":
    main()
