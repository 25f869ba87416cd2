"""Named recipes for deepseek_v3 (entry-point group ``plait.recipes``): ``--config <name>``.

Each returns a complete ``JobConfig``; command-line flags override any field. Experts are
balanced as in DeepSeek-V3: bias updates on the expert choice (aux-loss-free, rate 1e-3)
plus a small sequence-wise balance loss (1e-4).
"""
from __future__ import annotations

from plait.config import JobConfig
from plait.recipes import debug_recipe, pretraining_recipe


def _balanced(config: JobConfig) -> JobConfig:
    config.moe.load_balance_coeff = 1e-3
    config.moe.aux_loss_coeff = 1e-4
    config.moe.aux_loss_type = "sequence"
    return config


def deepseek_v3_debugmodel() -> JobConfig:
    """A small DeepSeek-V3 (1 dense + 3 MoE blocks, group-limited routing) on the embedded
    corpus; the loss falls within minutes on a laptop CPU."""
    return _balanced(debug_recipe("deepseek_v3", "debugmodel",
                                  "deepseek_v3 debug model on the embedded corpus (CPU friendly)"))


def _published(flavor: str, *, lr: float, steps: int) -> JobConfig:
    return _balanced(pretraining_recipe("deepseek_v3", flavor, lr=lr, steps=steps, seq_len=4096))


def deepseek_v3_16b() -> JobConfig:
    return _published("16B", lr=2.2e-4, steps=1000)


def deepseek_v3_671b() -> JobConfig:
    """DeepSeek-V3's peak learning rate (2.2e-4) at its pretraining context (4096 tokens)."""
    return _published("671B", lr=2.2e-4, steps=3000)
