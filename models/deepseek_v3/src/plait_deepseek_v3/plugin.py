"""Entry point of the deepseek_v3 model package (group ``plait.plugins``, name ``deepseek_v3``).

Kept import-light: the model, spec and adapter (and torch) load inside the hooks.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import plait
from plait.errors import ConfigError

if TYPE_CHECKING:
    from plait.config import JobConfig
    from plait.model_spec import ModelSpec
    from plait.parallel_dims import ParallelDims

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


@plait.hookimpl
def plait_validate(config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec) -> None:
    if model_spec.name != "deepseek_v3":  # this package may be enabled next to another model
        return
    if parallel_dims.tp > 1:
        raise ConfigError(
            f"deepseek_v3/{config.model.flavor} cannot use tensor parallelism yet: its MoE blocks and the "
            "replicated latent projections of its attention (wq_a, wkv_a and their norms) have no tp support. "
            "Use --parallelism.tp 1 and shard with fsdp, pp and (with the ep plugin) --parallelism.ep"
        )
