"""The ``mxfp8`` config section (``--mxfp8.<field>``), the shape rule and torchao's configs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from plait.errors import ConfigError

Recipe = Literal["rceil", "rceil_wgrad_with_hp"]
RECIPES: tuple[str, ...] = get_args(Recipe)

#: MXFP8 scales blocks of 32 elements along each matmul's reduction dimension: every
#: converted feature count, the tokens of a micro-batch and each expert's token group
#: must be multiples of it.
BLOCK_SIZE = 32


@dataclass(kw_only=True, slots=True)
class Mxfp8Config:
    recipe: Recipe = "rceil"
    """rceil: every matmul of forward and backward in MXFP8 (e4m3 elements, one e8m0 scale
    per 32 elements, scales rounded up); rceil_wgrad_with_hp: the weight gradient in high precision."""
    filter_fqns: list[str] = field(default_factory=lambda: ["output"])
    """Module path patterns (``*`` = one component) whose linears (and experts) stay in
    high precision; a pattern naming a module skips everything inside it. Default: the LM head."""
    grouped_experts: bool = True
    """Also train the MoE routed experts (grouped matmuls) in MXFP8; each expert's token
    group is padded to 32 rows."""
    emulate: bool = False
    """Emulate the MXFP8 matmuls in high precision (torchao's emulated kernels): for devices
    without MX kernels (CPU, GPUs before SM 10.0), tests and debugging; numerically MXFP8, not faster."""

    def validate(self) -> None:
        if self.recipe not in RECIPES:
            raise ConfigError(f"--mxfp8.recipe {self.recipe!r} is not an mxfp8 recipe; choose one of: "
                              + ", ".join(RECIPES))


def shape_rule(out_features: int, in_features: int) -> str | None:
    """Why a linear of this shape stays in high precision, or None."""
    if in_features % BLOCK_SIZE or out_features % BLOCK_SIZE:
        return f"in/out features {in_features}/{out_features} not multiples of {BLOCK_SIZE} (MXFP8 block size)"
    return None


def kernel_preference(section: Mxfp8Config):  # noqa: ANN201
    from torchao.quantization.quantize_.common import KernelPreference

    return KernelPreference.EMULATED if section.emulate else KernelPreference.AUTO


def grouped_op_config(section: Mxfp8Config):  # noqa: ANN201
    """torchao's training op config for the grouped experts. Their outputs are bfloat16
    (torchao's emulation dequantizes to bfloat16, and torch's CPU grouped matmul keeps its
    input dtype). MoE layers pad the token groups (``RunNeeds.moe_group_alignment``), so
    torchao does not."""
    import torch
    from torchao.prototype.moe_training.config import MXFP8TrainingOpConfig
    from torchao.prototype.mx_formats.config import ScaleCalculationMode

    return MXFP8TrainingOpConfig(
        kernel_preference=kernel_preference(section),
        out_dtype=torch.bfloat16,
        wgrad_with_hp=section.recipe == "rceil_wgrad_with_hp",
        scale_calculation_mode=ScaleCalculationMode.RCEIL,
        pad_token_groups_for_grouped_mm=False,
    )


def sm100_kernels_available() -> bool:
    """Whether this torchao installation has its MXFP8 kernels (CUDA extension and triton)."""
    from torchao.prototype.moe_training.mxfp8_grouped_mm import _SM100_KERNELS_AVAILABLE

    return bool(_SM100_KERNELS_AVAILABLE)
