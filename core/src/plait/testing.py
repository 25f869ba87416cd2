"""Helpers for multi-process tests of plait and its plugins.

``run_ranks(world_size, argv, out)`` runs ``plait train ARGV`` as ``world_size`` real
gloo ranks (one subprocess each, torchrun's environment, one thread per rank) and
returns rank 0's losses and gradient norms by step. ``python -m plait.testing OUT ARGV``
is the per-rank entry point it launches. ``losses_resumed_in_parallel`` compares one
process with a layout that resumes its first checkpoint. ``train_in_this_process(argv)``
is the same result of a run in this process, through ``keep_determinism_setting(run)``,
which restores torch's deterministic-algorithms switch afterwards;
``max_differences(run, reference)`` compares two such results step by step.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(world_size: int, argv: list[str], out: Path, *, timeout: float = 240) -> dict[str, dict[int, float]]:
    """Rank 0's ``{"losses": {step: loss}, "grad_norms": {step: norm}, "validation_losses":
    {step: loss}}`` of a distributed run."""
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
        procs.append(subprocess.Popen([sys.executable, "-m", "plait.testing", str(out), *argv], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        if proc.returncode != 0:
            raise AssertionError(f"rank {rank} exited with {proc.returncode}:\n{output[-4000:]}")
    raw = json.loads(Path(out).read_text())
    return {key: {int(step): value for step, value in raw.get(key, {}).items()}
            for key in ("losses", "grad_norms", "validation_losses")}


def keep_determinism_setting(run):
    """``run()``, leaving torch's deterministic-algorithms switch as it was (a
    ``--training.deterministic`` job in this process turns it on)."""
    import torch

    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        return run()
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def train_in_this_process(argv: list[str]) -> dict[str, dict[int, float]]:
    """``{"losses": {step: loss}, "grad_norms": {step: norm}, "validation_losses": {step:
    loss}}`` of a run in this process."""
    from plait.cli import train

    result = keep_determinism_setting(lambda: train(argv))
    return {"losses": result.losses, "grad_norms": result.grad_norms, "validation_losses": result.validation_losses}


def max_differences(run: dict[str, dict[int, float]], reference: dict[str, dict[int, float]]) -> tuple[float, float]:
    """Largest |Δloss| and |Δgrad norm| over the steps (which must be the same)."""
    assert sorted(run["losses"]) == sorted(reference["losses"]), (run, reference)
    loss = max(abs(run["losses"][s] - reference["losses"][s]) for s in reference["losses"])
    norm = max(abs(run["grad_norms"][s] - reference["grad_norms"][s]) for s in reference["grad_norms"])
    return loss, norm


def losses_resumed_in_parallel(
    folder: Path, argv_for: Callable[[Path], list[str]], parallel: list[str], *, ranks: int
) -> tuple[dict[int, float], dict[int, float]]:
    """One process's losses and those of the same job resumed over ``ranks`` gloo ranks.

    ``argv_for(dump_folder)`` is the job; it must checkpoint every step. It trains once
    in this process, then its step-1 checkpoint is resumed with ``parallel`` options
    added, so both runs start step 2 from the same weights whatever initialization does
    under the layout. Returns (single-process losses, parallel losses from step 2 on).
    """
    from plait.cli import train

    single = train(argv_for(folder / "single")).losses
    shutil.copytree(folder / "single" / "checkpoint" / "step-1", folder / "parallel" / "checkpoint" / "step-1")
    parallel_losses = run_ranks(ranks, [*argv_for(folder / "parallel"), *parallel], folder / "losses.json")["losses"]
    return single, parallel_losses


def check_plugins(*plugins: object, config: Any, parallel_dims: Any, model_spec: Any) -> Any:
    """The checks ``plait train`` runs before any work, with only ``plugins`` (modules or
    objects) enabled: their declared needs, the sequence length those imply, their
    ``plait_validate``. Returns the resolved ``Job``. For tests of a plugin's own checks."""
    from plait.job import resolve_with_plugins
    from plait.plugins import PluginManager

    manager = PluginManager()
    for index, plugin in enumerate(plugins):
        manager.register_object(plugin, getattr(plugin, "__name__", f"plugin{index}"))
    return resolve_with_plugins(config, manager, model_spec, parallel_dims)


def _rank_main() -> None:
    import torch

    torch.set_num_threads(1)
    from plait.cli import exit_process, train

    out, argv = sys.argv[1], sys.argv[2:]
    result = train(argv)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump({"losses": result.losses, "grad_norms": result.grad_norms,
                       "validation_losses": result.validation_losses}, f)
    exit_process(0)


if __name__ == "__main__":
    _rank_main()
