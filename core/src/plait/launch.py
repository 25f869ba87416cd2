"""What a process learns from its launcher and its machine before it trains: the rank and
world size torchrun set, joining the process group, and whether a step can fit in memory."""
from __future__ import annotations

import os
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from plait.errors import ConfigError, PlaitError

if TYPE_CHECKING:
    from plait.job import Job


def world_size_from_env() -> int:
    """The number of processes torchrun (or Slurm through it) started; 1 without a launcher."""
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.strip().isdigit() or int(value) < 1:
        raise ConfigError(f"the environment variable WORLD_SIZE must be a positive integer (torchrun sets it), "
                          f"got {value!r}: unset it for one process, or launch with torchrun --nproc_per_node N")
    return int(value)


def rank_from_env(name: str = "RANK") -> int:
    """This process's ``RANK`` (or ``LOCAL_RANK``) as torchrun sets it; 0 without a launcher."""
    value = os.environ.get(name, "0")
    world_size = world_size_from_env()
    if not value.strip().isdigit() or (name == "RANK" and int(value) >= world_size):
        bound = f" below WORLD_SIZE ({world_size})" if name == "RANK" else ""
        raise ConfigError(f"the environment variable {name} must be an integer >= 0{bound} (torchrun sets it), "
                          f"got {value!r}: unset it for one process, or launch with torchrun")
    return int(value)


def join_process_group(backend: str, timeout_seconds: float) -> None:
    """``init_process_group`` through torchrun's environment (MASTER_ADDR, MASTER_PORT);
    a bad port, an unreachable rank 0 or a timeout is one message."""
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    if port and not (port.strip().isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"the environment variable MASTER_PORT must be a port number (1-65535), got {port!r}: "
                          "launch with torchrun, which sets it, or fix it")
    try:
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_seconds))
    except (ValueError, RuntimeError) as error:  # DistNetworkError and DistStoreError are RuntimeErrors
        raise PlaitError(
            f"this rank could not join the run's process group at MASTER_ADDR {address or '(unset)'} MASTER_PORT "
            f"{port or '(unset)'} ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            "Launch every rank with torchrun (or Slurm through it), check that rank 0's host is reachable from "
            "this one, or raise --job.pg_timeout_seconds"
        ) from None


def is_out_of_memory(error: BaseException) -> bool:
    """An allocation that failed: ``torch.OutOfMemoryError`` on accelerators, a RuntimeError
    from the CPU allocator."""
    return isinstance(error, torch.OutOfMemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(error)


def minimum_step_bytes(job: Job) -> tuple[int, str]:
    """A lower bound of what one rank needs for a step, from the config alone (no
    allocation): weights, gradients and AdamW's two states, fp32, spread over every rank;
    one hidden state per layer; the logits of the micro-batch and their gradient, in the
    compute dtype (the loss keeps no fp32 copy of them). The real peak is several times
    larger (``plait plan`` measures it); what exceeds even this cannot run."""
    args, training = job.model_args, job.config.training
    tokens = training.local_batch_size * training.seq_len
    parameters = sum(p.numel() for p in job.meta_model.parameters())
    state = 4 * 4 * parameters // job.parallel_dims.world_size
    hidden = 4 * tokens * int(getattr(args, "dim", 0) or 0) * max(1, int(getattr(args, "n_layers", 1) or 1))
    logits_dtype_bytes = 2 if training.dtype == "bfloat16" else 4
    logits = 2 * logits_dtype_bytes * tokens * int(getattr(args, "vocab_size", 0) or 0)
    parts = [f"weights, gradients and optimizer state {_gib(state)}", f"hidden states {_gib(hidden)}"]
    if logits:
        parts.append(f"logits of {training.local_batch_size}×{training.seq_len} tokens {_gib(logits)}")
    return state + hidden + logits, ", ".join(parts)


def device_memory_bytes(device: torch.device) -> int | None:
    """The memory one rank may use: the accelerator's total, or this host's available
    memory shared by its ranks; None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    local_ranks = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return available // (int(local_ranks) if local_ranks.isdigit() and int(local_ranks) > 0 else 1)


def check_memory_fits(job: Job, device: torch.device) -> None:
    """Refuse, before anything is allocated, a sequence length or batch that cannot fit."""
    available = device_memory_bytes(device)
    if available is None:
        return
    needed, parts = minimum_step_bytes(job)
    if needed > available:
        training = job.config.training
        raise ConfigError(
            f"--training.seq_len {training.seq_len} with --training.local_batch_size {training.local_batch_size} "
            f"cannot fit: a step needs at least {_gib(needed)} per rank ({parts}), and this rank has "
            f"{_gib(available)} of {device.type} memory. Lower --training.local_batch_size (raise "
            "--training.global_batch_size to keep the batch through accumulation) or --training.seq_len, or shard "
            "over more ranks; `plait plan` estimates the whole need"
        )


def _gib(size: int) -> str:
    return f"{size / 1024**3:.1f} GiB" if size >= 1024**3 else f"{size / 1024**2:.0f} MiB"
