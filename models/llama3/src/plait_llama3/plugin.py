"""Entry point of the llama3 model package (group ``plait.plugins``, name ``llama3``).

Kept import-light: the model, spec and adapter (and torch) load inside the hook.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import plait

if TYPE_CHECKING:
    from plait.model_spec import ModelSpec

PLAIT_API_VERSION = 1
PROVIDES = ("model:llama3",)
REQUIRES = ()
DESCRIPTION = "Llama 3 / 3.1 decoder (debug, 8B, 70B, 405B flavors) with Hugging Face import and export"


@plait.hookimpl
def plait_register_models(register: Callable[[ModelSpec], None]) -> None:
    from plait_llama3.spec import llama3_spec

    register(llama3_spec())
