"""Named recipes for qwen3 (entry-point group ``plait.recipes``): ``--config <name>``.

Each returns a complete ``JobConfig``; command-line flags override any field. The
published-size recipes are starting points: Qwen did not publish its optimizer settings.
"""
from __future__ import annotations

from plait.config import JobConfig
from plait.recipes import debug_recipe, pretraining_recipe


def _debug(flavor: str, description: str) -> JobConfig:
    return debug_recipe("qwen3", flavor, description)


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
    return pretraining_recipe("qwen3", flavor, lr=lr, steps=steps, seq_len=4096)


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
