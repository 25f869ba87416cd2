"""Shared pieces of the layout-parity tests: a short deterministic job of any recipe, one
process's reference run, the comparison, and every parameter's first-step gradient.

A parity test trains the same global batch once in this process and once over gloo
ranks (``plait.testing.run_ranks``), then compares the per-step losses and gradient
norms. ``--training.deterministic`` makes the initial weights independent of the layout.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.multiprocessing as mp

from plait.cli import resolve_train_config, train
from plait.testing import free_port


def parity_job(
    dump: Path, config: str, *extra: str, local_batch_size: int, steps: int, checkpoint_interval: int = 0
) -> list[str]:
    """``steps`` fp32 steps of recipe ``config`` on sequences of 64 tokens; checkpoints
    every ``checkpoint_interval`` steps (0: none)."""
    checkpoint = (
        ["--checkpoint.enable", "True", "--checkpoint.interval", str(checkpoint_interval)]
        if checkpoint_interval
        else ["--checkpoint.enable", "False"]
    )
    return [
        "--config", config,
        "--training.steps", str(steps),
        "--training.seq_len", "64",
        "--training.local_batch_size", str(local_batch_size),
        "--training.deterministic", "True",
        "--lr_scheduler.warmup_steps", "2",
        *checkpoint,
        "--metrics.progress", "off",
        "--job.pg_timeout_seconds", "90",
        "--job.dump_folder", str(dump),
        *extra,
    ]  # fmt: skip


def keep_determinism_setting(run):
    """``run()``, leaving torch's deterministic-algorithms switch as it was (a
    ``--training.deterministic`` job in this process turns it on)."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        return run()
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def train_in_this_process(argv: list[str]) -> dict[str, dict[int, float]]:
    """``{"losses": {step: loss}, "grad_norms": {step: norm}}`` of a run in this process."""
    result = keep_determinism_setting(lambda: train(argv))
    return {"losses": result.losses, "grad_norms": result.grad_norms}


def max_differences(run: dict[str, dict[int, float]], reference: dict[str, dict[int, float]]) -> tuple[float, float]:
    """Largest |Δloss| and |Δgrad norm| over the steps (which must be the same)."""
    assert sorted(run["losses"]) == sorted(reference["losses"]), (run, reference)
    loss = max(abs(run["losses"][s] - reference["losses"][s]) for s in reference["losses"])
    norm = max(abs(run["grad_norms"][s] - reference["grad_norms"][s]) for s in reference["grad_norms"])
    return loss, norm


# ------------------------------------------------------------------ first-step gradients


def first_step_gradients(argv: list[str]) -> dict[str, torch.Tensor]:
    """Full gradients of every parameter after the first micro-batch's backward."""
    from plait.train import Trainer

    manager, spec, config = resolve_train_config(argv)
    trainer = Trainer(config, manager, spec)
    try:
        model = trainer.model_parts[0]
        inputs, labels = next(trainer.batches())
        trainer.loss_fn(model(inputs), labels).backward()
        return {
            name.replace("_checkpoint_wrapped_module.", ""): (
                param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
            )
            for name, param in model.named_parameters()
        }
    finally:
        trainer.close()


def _gradient_rank(rank: int, world_size: int, port: int, argv: list[str], folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    gradients = first_step_gradients(argv)
    if rank == 0:
        torch.save(gradients, os.path.join(folder, "gradients.pt"))


def distributed_first_step_gradients(world_size: int, argv: list[str], folder: Path) -> dict[str, torch.Tensor]:
    """``first_step_gradients`` of a run over ``world_size`` gloo ranks (rank 0's full tensors)."""
    mp.spawn(_gradient_rank, args=(world_size, free_port(), argv, str(folder)), nprocs=world_size, join=True)
    return torch.load(folder / "gradients.pt")
