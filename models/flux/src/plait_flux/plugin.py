"""Entry point of the flux model package (group ``plait.plugins``, name ``flux``).

Kept import-light: the model, spec and pipeline (and torch) load inside the hooks.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import plait

if TYPE_CHECKING:
    from plait.config import JobConfig
    from plait.job import Job
    from plait.model_spec import ModelSpec
    from plait.parallel_dims import ParallelDims

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


@plait.hookimpl
def plait_validate(config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec, job: Job) -> None:
    """Context parallelism cuts each sample's image and text tokens into 2 × cp equal chunks."""
    if model_spec.name != "flux" or parallel_dims.cp <= 1:
        return
    from plait.errors import ConfigError
    from plait_flux.pipeline import flux_config, image_tokens

    chunks = 2 * parallel_dims.cp
    lengths = {"image tokens (set by --flux.image_size)": image_tokens(config),
               "--flux.caption_tokens": flux_config(config).caption_tokens}
    for what, length in lengths.items():
        if length % chunks:
            raise ConfigError(
                f"--parallelism.cp {parallel_dims.cp} cuts each sample's image and text tokens into 2 × cp = "
                f"{chunks} equal chunks, but its {what} is {length}: choose sizes that are multiples of {chunks}"
            )
