"""Entry point of the qwen3 model package (group ``plait.plugins``, name ``qwen3``).

Kept import-light: the model, spec and adapter (and torch) load inside the hooks.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import plait

if TYPE_CHECKING:
    from torch import nn

    from plait.config import JobConfig
    from plait.model_spec import ModelSpec
    from plait.parallel_dims import ParallelDims

PLAIT_API_VERSION = 1
PROVIDES = ("model:qwen3",)
REQUIRES = ()
DESCRIPTION = "Qwen3 decoder, dense (0.6B-32B) and MoE (30B-A3B, 235B-A22B), with Hugging Face import and export"


@plait.hookimpl
def plait_register_models(register: Callable[[ModelSpec], None]) -> None:
    from plait_qwen3.spec import qwen3_spec

    register(qwen3_spec())


def _is_qwen3(model_spec: ModelSpec) -> bool:
    return model_spec.name == "qwen3"  # this package may be enabled next to another model


@plait.hookimpl
def plait_apply_tensor_parallel(
    model: nn.Module, config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec
) -> None:
    """The per-head q/k norms, which the generic TP plan styles do not cover."""
    if not _is_qwen3(model_spec) or parallel_dims.tp <= 1:
        return
    from plait_qwen3.tensor_parallel import parallelize_head_norms

    parallelize_head_norms(model, parallel_dims.get_mesh("tp"))
