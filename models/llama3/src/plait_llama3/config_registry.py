"""Named recipes for llama3 (entry-point group ``plait.recipes``): ``--config <name>``.

Each returns a complete ``JobConfig``; command-line flags override any field.
"""
from __future__ import annotations

from plait.config import JobConfig
from plait.recipes import debug_recipe, pretraining_recipe


def llama3_debugmodel() -> JobConfig:
    """A small Llama trained on the embedded corpus; the loss falls within minutes on a laptop CPU."""
    config = debug_recipe("llama3", "debugmodel", "llama3 debug model on the embedded corpus (CPU friendly)")
    # torch's fused AdamW: on CPU about 7x faster than foreach, and without foreach's
    # parameter-sized temporaries (docs/performance.md).
    config.optimizer.implementation = "fused"
    return config


def _published(flavor: str, *, lr: float, steps: int) -> JobConfig:
    return pretraining_recipe("llama3", flavor, lr=lr, steps=steps, seq_len=8192)


def llama3_8b() -> JobConfig:
    return _published("8B", lr=3e-4, steps=1000)


def llama3_70b() -> JobConfig:
    return _published("70B", lr=1.5e-4, steps=1000)


def llama3_405b() -> JobConfig:
    return _published("405B", lr=8e-5, steps=3000)
