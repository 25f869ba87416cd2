"""Entry point of the qwen3 model package (group ``plait.plugins``, name ``qwen3``).

Kept import-light: the model, spec and adapter (and torch) load inside the hook. The
per-head q/k norms reach the tp plugin through the spec (``TPPlan.extra``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import plait

if TYPE_CHECKING:
    from plait.model_spec import ModelSpec

PLAIT_API_VERSION = 1
PROVIDES = ("model:qwen3",)
REQUIRES = ()
DESCRIPTION = "Qwen3 decoder, dense (0.6B-32B) and MoE (30B-A3B, 235B-A22B), with Hugging Face import and export"


@plait.hookimpl
def plait_register_models(register: Callable[[ModelSpec], None]) -> None:
    from plait_qwen3.spec import qwen3_spec

    register(qwen3_spec())

