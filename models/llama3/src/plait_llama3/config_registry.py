"""Named recipes for llama3 (entry-point group ``plait.recipes``): ``--config <name>``.

Each returns a complete ``JobConfig``; command-line flags override any field.
"""
from __future__ import annotations

from plait.config import JobConfig


def _job(flavor: str, description: str) -> JobConfig:
    config = JobConfig()
    config.model.name = "llama3"
    config.model.flavor = flavor
    config.job.description = description
    return config


def llama3_debugmodel() -> JobConfig:
    """A small Llama trained on the embedded corpus; the loss falls within minutes on a laptop CPU."""
    config = _job("debugmodel", "llama3 debug model on the embedded corpus (CPU friendly)")
    config.training.steps = 50
    config.training.seq_len = 256
    config.training.local_batch_size = 8
    config.optimizer.lr = 8e-4
    # torch's fused AdamW: on CPU about 7x faster than foreach, and without foreach's
    # parameter-sized temporaries (docs/performance.md).
    config.optimizer.implementation = "fused"
    config.lr_scheduler.warmup_steps = 5
    config.checkpoint.interval = 25
    return config


def _published(flavor: str, *, lr: float, steps: int) -> JobConfig:
    config = _job(flavor, f"llama3 {flavor} pretraining")
    config.training.seq_len = 8192
    config.training.local_batch_size = 1
    config.training.steps = steps
    config.training.dtype = "bfloat16"
    config.training.max_norm = 1.0
    config.optimizer.lr = lr
    config.optimizer.eps = 1e-8
    config.optimizer.weight_decay = 0.1
    config.optimizer.implementation = "fused"
    config.lr_scheduler.warmup_steps = 200
    config.lr_scheduler.decay_type = "cosine"
    config.lr_scheduler.min_lr_factor = 0.1
    config.activation_checkpoint.mode = "selective"
    config.activation_checkpoint.selective_option = "op"
    config.compile.enable = True
    config.checkpoint.interval = 500
    config.metrics.log_freq = 10
    return config


def llama3_8b() -> JobConfig:
    return _published("8B", lr=3e-4, steps=1000)


def llama3_70b() -> JobConfig:
    return _published("70B", lr=1.5e-4, steps=1000)


def llama3_405b() -> JobConfig:
    return _published("405B", lr=8e-5, steps=3000)
