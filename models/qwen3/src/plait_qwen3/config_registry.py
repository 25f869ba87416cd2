"""Named recipes for qwen3 (entry-point group ``plait.recipes``): ``--config <name>``.

Each returns a complete ``JobConfig``; command-line flags override any field. The
published-size recipes are starting points: Qwen did not publish its optimizer settings.
"""
from __future__ import annotations

from plait.config import JobConfig


def _job(flavor: str, description: str) -> JobConfig:
    config = JobConfig()
    config.model.name = "qwen3"
    config.model.flavor = flavor
    config.job.description = description
    return config


def _debug(flavor: str, description: str) -> JobConfig:
    config = _job(flavor, description)
    config.training.steps = 50
    config.training.seq_len = 256
    config.training.local_batch_size = 8
    config.optimizer.lr = 8e-4
    config.lr_scheduler.warmup_steps = 5
    config.checkpoint.interval = 25
    return config


def qwen3_debugmodel() -> JobConfig:
    """A small dense Qwen3 trained on the embedded corpus; the loss falls within minutes on a laptop CPU."""
    return _debug("debugmodel", "qwen3 dense debug model on the embedded corpus (CPU friendly)")


def qwen3_moe_debugmodel() -> JobConfig:
    """A small Qwen3-MoE (8 experts, top 2) on the embedded corpus, balanced by the auxiliary loss."""
    config = _debug("debugmodel_moe", "qwen3 mixture-of-experts debug model on the embedded corpus (CPU friendly)")
    config.moe.aux_loss_coeff = 1e-3
    config.moe.aux_loss_type = "batch"
    return config


def _published(flavor: str, *, lr: float, steps: int = 1000) -> JobConfig:
    config = _job(flavor, f"qwen3 {flavor} pretraining")
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


def _published_moe(flavor: str, *, lr: float) -> JobConfig:
    config = _published(flavor, lr=lr)
    # Qwen3-MoE balances its experts with a global-batch auxiliary loss (HF router_aux_loss_coef 0.001).
    config.moe.aux_loss_coeff = 1e-3
    config.moe.aux_loss_type = "batch"
    return config


def qwen3_0_6b() -> JobConfig:
    return _published("0.6B", lr=3e-4)


def qwen3_1_7b() -> JobConfig:
    return _published("1.7B", lr=3e-4)


def qwen3_4b() -> JobConfig:
    return _published("4B", lr=3e-4)


def qwen3_8b() -> JobConfig:
    return _published("8B", lr=3e-4)


def qwen3_14b() -> JobConfig:
    return _published("14B", lr=2e-4)


def qwen3_32b() -> JobConfig:
    return _published("32B", lr=1.5e-4)


def qwen3_30b_a3b() -> JobConfig:
    return _published_moe("30B-A3B", lr=3e-4)


def qwen3_235b_a22b() -> JobConfig:
    return _published_moe("235B-A22B", lr=1e-4)
