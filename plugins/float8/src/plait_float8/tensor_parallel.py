"""float8 under tensor parallelism: the converted linears and the modules that gather
their input for them get float8 styles (``plait.model_spec.TP_STYLE_CLASSES``), so the
sequence-sharded activations are cast to float8 before they are all-gathered (1 byte per
element), and the output gradients before their all-gather in the backward.

Tensorwise scales only (one scale per tensor, reduced over the tp ranks, so every rank
casts with the scale one process would use), and e4m3fn forward casts (torchao's input
preparation knows no other type). A module the plan prepares (``prepare_input``) takes
its input in float8 only when every linear below it is a converted linear with a
``colwise`` or ``rowwise`` style: that input then feeds float8 matmuls alone.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from torch import nn

from plait.model_spec import TP_STYLE_CLASSES, module_path_matches

if TYPE_CHECKING:
    from plait_float8.config import Float8Config

SHARDED_LINEAR_STYLES = ("colwise", "rowwise")


def why_not_float8_styles(section: Float8Config, forward_dtype: str) -> str | None:
    """Why the plain TP styles are used under tensor parallelism, or None."""
    if section.recipe != "tensorwise":
        return f"recipe {section.recipe} scales rows, and torchao's float8 TP styles scale whole tensors"
    if forward_dtype != "float8_e4m3fn":
        return f"torchao's float8 TP input preparation casts to float8_e4m3fn only, this device's is {forward_dtype}"
    return None


def mark_float8_styles(model: nn.Module, plan_styles: Mapping[str, str]) -> list[str]:
    """Attach float8 style classes to the converted linears and their gathering parents;
    returns the paths marked."""
    from torchao.float8.float8_linear import Float8Linear
    from torchao.float8.float8_tensor_parallel import (
        Float8ColwiseParallel,
        Float8RowwiseParallel,
        PrepareFloat8ModuleInput,
    )

    def style_of(path: str) -> str | None:
        return next((style for pattern, style in plan_styles.items() if module_path_matches(pattern, path)), None)

    def float8_sharded(path: str, module: nn.Module) -> bool:
        return isinstance(module, Float8Linear) and style_of(path) in SHARDED_LINEAR_STYLES

    marked = []
    for path, module in model.named_modules():
        if float8_sharded(path, module):
            setattr(module, TP_STYLE_CLASSES, {"colwise": Float8ColwiseParallel, "rowwise": Float8RowwiseParallel})
        elif path and style_of(path) == "prepare_input":
            linears = [(f"{path}.{name}", sub) for name, sub in module.named_modules() if isinstance(sub, nn.Linear)]
            if not linears or not all(float8_sharded(*linear) for linear in linears):
                continue
            setattr(module, TP_STYLE_CLASSES, {"prepare_input": PrepareFloat8ModuleInput})
        else:
            continue
        marked.append(path)
    return marked


def gather_float8_as_bytes() -> None:
    """All-gather float8 activations as their bytes (uint8 views: the same payload, the
    same values), because gloo (CPU) refuses float8 dtypes; NCCL gathers bytes alike."""
    import torch
    from torchao.float8 import float8_ops
    from torchao.float8.float8_training_tensor import Float8TrainingTensor

    def gather_bytes(aten_op, args, kwargs=None):  # noqa: ANN001, ANN202
        source: Float8TrainingTensor = args[0]
        data = source._data.contiguous()
        gathered = aten_op(data.view(torch.uint8), *args[1:], **(kwargs or {})).view(data.dtype)
        return Float8TrainingTensor(gathered, source._scale, source._orig_dtype, source._linear_mm_config,
                                    source._gemm_input_role)

    for op in (torch.ops.c10d_functional.all_gather_into_tensor.default,
               torch.ops._c10d_functional.all_gather_into_tensor.default):
        float8_ops.FLOAT8_OPS_TABLE[op] = gather_bytes
