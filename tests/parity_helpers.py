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

from plait.cli import exit_process, resolve_train_config
from plait.testing import free_port, keep_determinism_setting, max_differences, train_in_this_process

__all__ = [
    "distributed_first_step_gradients",
    "first_step_gradients",
    "keep_determinism_setting",
    "max_differences",
    "parity_job",
    "train_in_this_process",
]


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


# ------------------------------------------------------------------ first-step gradients


def first_step_gradients(argv: list[str]) -> dict[str, torch.Tensor]:
    """Full gradients of every parameter after the first micro-batch's backward."""
    from plait.train import Trainer

    trainer = Trainer(resolve_train_config(argv))
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
    exit_process(0)  # WORLD_SIZE is set: without the interpreter's teardown


def distributed_first_step_gradients(world_size: int, argv: list[str], folder: Path) -> dict[str, torch.Tensor]:
    """``first_step_gradients`` of a run over ``world_size`` gloo ranks (rank 0's full tensors)."""
    mp.spawn(_gradient_rank, args=(world_size, free_port(), argv, str(folder)), nprocs=world_size, join=True)
    return torch.load(folder / "gradients.pt")
