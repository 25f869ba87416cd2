"""Entry point of the deepseek_v3 model package (group ``plait.plugins``, name ``deepseek_v3``).

Kept import-light: the model, spec and adapter (and torch) load inside the hooks.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import plait

if TYPE_CHECKING:
    from plait.model_spec import ModelSpec

PLAIT_API_VERSION = 1
PROVIDES = ("model:deepseek_v3",)
REQUIRES = ()
DESCRIPTION = (
    "DeepSeek-V3 decoder (multi-head latent attention, DeepSeekMoE; debug, 16B, 671B flavors) with Hugging Face "
    "import (incl. block-wise fp8) and export"
)


@plait.hookimpl
def plait_register_models(register: Callable[[ModelSpec], None]) -> None:
    from plait_deepseek_v3.spec import deepseek_v3_spec

    register(deepseek_v3_spec())
