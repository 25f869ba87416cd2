"""Block-wise fp8 weights as the official DeepSeek-V3 checkpoint stores them.

Each quantized linear weight ``W [out, in]`` is saved as ``<name>.weight`` in
``float8_e4m3fn`` next to ``<name>.weight_scale_inv``: one float32 scale per 128×128
block, shape ``[ceil(out / 128), ceil(in / 128)]``. The weight is
``W = fp8.float() * scale_inv`` with each scale spread over its block (the last blocks of
a row or column may be partial).
"""
from __future__ import annotations

import math

import torch

from plait.errors import CheckpointError

BLOCK_SIZE = (128, 128)
SCALE_SUFFIX = ".weight_scale_inv"


def is_fp8(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() and tensor.element_size() == 1


def dequantize_blockwise(
    weight: torch.Tensor, scale_inv: torch.Tensor, *, name: str, block_size: tuple[int, int] = BLOCK_SIZE
) -> torch.Tensor:
    """The float32 weight of an fp8 ``weight`` ``[out, in]`` and its block scales."""
    if weight.dim() != 2:
        raise CheckpointError(f"{name}: block-wise fp8 weights must be 2-D, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    block_rows, block_cols = block_size
    expected = (math.ceil(rows / block_rows), math.ceil(cols / block_cols))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(
            f"{name}: weight_scale_inv has shape {tuple(scale_inv.shape)}, but a {rows}x{cols} weight in "
            f"{block_rows}x{block_cols} blocks needs {expected}"
        )
    scales = scale_inv.float().repeat_interleave(block_rows, dim=0)[:rows]
    scales = scales.repeat_interleave(block_cols, dim=1)[:, :cols]
    return weight.float() * scales


def dequantize_state_dict(hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``hf_state_dict`` with every fp8 ``<name>.weight`` replaced by its float32 value and
    the ``<name>.weight_scale_inv`` tensors consumed; other tensors unchanged."""
    scales = {key.removesuffix(SCALE_SUFFIX): key for key in hf_state_dict if key.endswith(SCALE_SUFFIX)}
    orphans = [key for prefix, key in scales.items() if f"{prefix}.weight" not in hf_state_dict]
    if orphans:
        raise CheckpointError(
            f"the HF checkpoint has scales without their fp8 weight: {', '.join(sorted(orphans)[:5])}"
        )
    unscaled = [key for key, tensor in hf_state_dict.items()
                if is_fp8(tensor) and key.removesuffix(".weight") not in scales]  # fmt: skip
    if unscaled:
        raise CheckpointError(
            f"the HF checkpoint has fp8 tensors without a {SCALE_SUFFIX.lstrip('.')}: {', '.join(sorted(unscaled)[:5])}"
        )
    out: dict[str, torch.Tensor] = {}
    for key, tensor in hf_state_dict.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        prefix = key.removesuffix(".weight")
        if key.endswith(".weight") and prefix in scales:
            tensor = dequantize_blockwise(tensor, hf_state_dict[scales[prefix]], name=key)
        out[key] = tensor
    return out
