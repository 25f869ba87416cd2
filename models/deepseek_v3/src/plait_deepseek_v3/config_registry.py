"""Named recipes for deepseek_v3 (entry-point group ``plait.recipes``): ``--config <name>``.

Each returns a complete ``JobConfig``; command-line flags override any field. Experts are
balanced as in DeepSeek-V3: bias updates on the expert choice (aux-loss-free, rate 1e-3)
plus a small sequence-wise balance loss (1e-4).
"""
from __future__ import annotations

from plait.config import JobConfig


def _job(flavor: str, description: str) -> JobConfig:
    config = JobConfig()
    config.model.name = "deepseek_v3"
    config.model.flavor = flavor
    config.job.description = description
    config.moe.load_balance_coeff = 1e-3
    config.moe.aux_loss_coeff = 1e-4
    config.moe.aux_loss_type = "sequence"
    return config


def deepseek_v3_debugmodel() -> JobConfig:
    """A small DeepSeek-V3 (1 dense + 3 MoE blocks, group-limited routing) on the embedded
    corpus; the loss falls within minutes on a laptop CPU."""
    config = _job("debugmodel", "deepseek_v3 debug model on the embedded corpus (CPU friendly)")
    config.training.steps = 50
    config.training.seq_len = 256
    config.training.local_batch_size = 8
    config.optimizer.lr = 8e-4
    config.lr_scheduler.warmup_steps = 5
    config.checkpoint.interval = 25
    return config


def _published(flavor: str, *, lr: float, steps: int) -> JobConfig:
    config = _job(flavor, f"deepseek_v3 {flavor} pretraining")
    config.training.seq_len = 4096
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


def deepseek_v3_16b() -> JobConfig:
    return _published("16B", lr=2.2e-4, steps=1000)


def deepseek_v3_671b() -> JobConfig:
    """DeepSeek-V3's peak learning rate (2.2e-4) at its pretraining context (4096 tokens)."""
    return _published("671B", lr=2.2e-4, steps=3000)
