"""Replica groups as real processes for the torchft tests: a lighthouse in the test
process, each group a set of ``plait train`` ranks (``python -m plait.testing``, one
thread each) with its own store port, started, killed and restarted independently."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plait.testing import free_port

#: Short but bounded: a heartbeat-silent group is dropped after 2 s.
LIGHTHOUSE_HEARTBEAT_TIMEOUT_MS = 2000
#: Timeouts that keep the hierarchy (heartbeat < connect < operation < quorum < group collectives).
FT_TIMEOUTS = ["--torchft.heartbeat_interval_ms", "100", "--torchft.connect_timeout_seconds", "5",
               "--torchft.timeout_seconds", "20", "--torchft.quorum_timeout_seconds", "60",
               "--job.pg_timeout_seconds", "90"]  # fmt: skip

#: The one-rank launch of conftest.py: steps of the synchronous three-group run; steps and
#: interval of the LocalSGD and DiLoCo runs.
SYNC_STEPS, SEMISYNC_STEPS, SYNC_EVERY = 4, 6, 2
SEMISYNC_MODES = ("local_sgd", "diloco")


def start_lighthouse(min_replicas: int, *, join_timeout_ms: int = 20000) -> Any:
    from torchft._torchft import LighthouseServer

    return LighthouseServer(bind="127.0.0.1:0", min_replicas=min_replicas, join_timeout_ms=join_timeout_ms,
                            quorum_tick_ms=50, heartbeat_timeout_ms=LIGHTHOUSE_HEARTBEAT_TIMEOUT_MS)


@dataclass
class Group:
    index: int
    ranks: int
    argv: list[str]
    out: Path
    env: dict[str, str] = field(default_factory=dict)  # added to each rank's environment
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def start(self, attempt: int = 0) -> Group:
        port = str(free_port())
        self.procs, self.logs = [], []
        for rank in range(self.ranks):
            env = {**os.environ, **self.env, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                   "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(self.ranks),
                   "LOCAL_WORLD_SIZE": str(self.ranks)}
            log = self.out.parent / f"group{self.index}-attempt{attempt}-rank{rank}.log"
            with open(log, "w") as handle:
                self.procs.append(subprocess.Popen([sys.executable, "-m", "plait.testing", str(self.out), *self.argv],
                                                   env=env, stdout=handle, stderr=subprocess.STDOUT))
            self.logs.append(log)
        return self

    def kill(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGKILL)
        for proc in self.procs:
            proc.wait()

    def wait(self, deadline: float) -> None:
        """Every rank exits 0 before ``deadline`` (time.monotonic()), or all are killed."""
        try:
            for proc in self.procs:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"group {self.index} did not finish in time:\n{self.tail()}") from None
        failed = [rank for rank, proc in enumerate(self.procs) if proc.returncode != 0]
        assert not failed, f"group {self.index} ranks {failed} failed:\n{self.tail()}"

    def tail(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-chars:]}" for log in self.logs)

    def result(self) -> dict[str, dict[int, float]]:
        raw = json.loads(self.out.read_text())
        return {key: {int(step): value for step, value in raw[key].items()} for key in ("losses", "grad_norms")}


def stop_all(groups: list[Group]) -> None:
    for group in groups:
        for proc in group.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()


def events(dump: Path, group: int) -> list[dict[str, Any]]:
    path = dump / f"replica_{group}" / "torchft_events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_event(dump: Path, group: int, kind: str, step: int, deadline: float, *, after: float = 0.0,
                   poll: float = 0.1) -> dict[str, Any]:
    """The first ``kind`` event of the group at ``step`` or later, written after the time
    ``after`` (time.time()); waits for it until ``deadline`` (time.monotonic())."""
    while time.monotonic() < deadline:
        found = [e for e in events(dump, group) if e["event"] == kind and e["step"] >= step and e["time"] > after]
        if found:
            return found[0]
        time.sleep(poll)
    raise AssertionError(f"group {group} reached no {kind} at step >= {step} in time: {events(dump, group)[-5:]}")


def weight_digests(dump: Path, group: int, kind: str = "commit") -> dict[int, str]:
    """The digests of the group's weights by step, from its ``kind`` events (commits at
    checkpoint steps; every applied sync in LocalSGD/DiLoCo)."""
    return {e["step"]: e["weights"] for e in events(dump, group) if e["event"] == kind and "weights" in e}


def checkpoint_weights(dump: Path, model: str, flavor: str, *, step: int) -> dict[str, Any]:
    """The model weights of the run's checkpoint of ``step`` (written by group 0)."""
    from plait.checkpoint import load_model_state
    from plait.plugins import load_model_spec
    from plait.testing import materialize

    spec = load_model_spec(model)
    state = materialize(spec, spec.args_for(flavor)).state_dict()
    load_model_state(str(dump / "checkpoint" / f"step-{step}"), state)
    return state


def job_argv(dump: Path, lighthouse: Any, index: int, options: tuple[str, ...] = (), *, groups: int = 2,
             ranks: int = 1, recipe: str = "tinylm_debug", steps: int, lr: float = 1e-2) -> list[str]:
    """The options of group ``index`` of ``groups`` groups of ``ranks`` ranks (one row per
    rank and step) training ``steps`` steps into ``dump``, every group needed for a quorum."""
    from plait.testing import short_job

    return short_job(recipe, dump, *options, "--plugins", "fsdp,torchft", "--parallelism.dp_shard", str(ranks),
                     "--torchft.lighthouse", lighthouse.address(), "--torchft.replica_groups", str(groups),
                     "--torchft.replica_group", str(index), "--torchft.min_replicas", str(groups), *FT_TIMEOUTS,
                     steps=steps, lr=lr, local_batch_size=1, checkpoint_interval=steps)


def start_groups(dump: Path, lighthouse: Any, *, groups: int, ranks: int, recipe: str, options: tuple[str, ...] = (),
                 steps: int, env_for: Any = None) -> list[Group]:
    """``groups`` groups (``job_argv``), started, not awaited. ``env_for(index)``:
    environment variables of a group's ranks."""
    started = []
    for index in range(groups):
        argv = job_argv(dump, lighthouse, index, options, groups=groups, ranks=ranks, recipe=recipe, steps=steps)
        env = env_for(index) if env_for is not None else {}
        started.append(Group(index, ranks, argv, dump.parent / f"{dump.name}-out{index}.json", env=env).start())
    return started
