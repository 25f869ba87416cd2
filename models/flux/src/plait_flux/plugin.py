"""Entry point of the flux model package (group ``plait.plugins``, name ``flux``).

Kept import-light: the model, spec and pipeline (and torch) load inside the hooks.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import plait

if TYPE_CHECKING:
    from plait.model_spec import ModelSpec

PLAIT_API_VERSION = 1
PROVIDES = ("model:flux",)
REQUIRES = ()
DESCRIPTION = "FLUX.1 diffusion transformer (debug, flux-dev, flux-schnell) trained by rectified flow on its own data pipeline"


@plait.hookimpl
def plait_register_models(register: Callable[[ModelSpec], None]) -> None:
    from plait_flux.spec import flux_spec

    register(flux_spec())


@plait.hookimpl
def plait_add_config_sections(register: Callable[[str, type], None]) -> None:
    from plait_flux.config import FluxConfig

    register("flux", FluxConfig)
