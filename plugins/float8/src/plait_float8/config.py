"""The ``float8`` config section (``--float8.<field>``) and its torchao config."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

from plait.errors import ConfigError

if TYPE_CHECKING:
    import torch

Recipe = Literal["tensorwise", "rowwise", "rowwise_with_gw_hp"]
RECIPES: tuple[str, ...] = get_args(Recipe)


@dataclass(kw_only=True, slots=True)
class Float8Config:
    recipe: Recipe = "tensorwise"
    """tensorwise: one scale per tensor (fastest; float8 FSDP all-gather possible).
    rowwise: one scale per row, power-of-two scales (more accurate).
    rowwise_with_gw_hp: rowwise, with the weight gradient in high precision (most accurate)."""
    filter_fqns: list[str] = field(default_factory=lambda: ["output"])
    """Module path patterns (``*`` = one component) whose linears stay in high precision;
    a pattern naming a module skips every linear inside it. Default: the LM head."""
    auto_filter: bool = True
    """Skip linears too small for float8 to be faster (torchao's H100 thresholds per recipe)."""
    emulate: bool = False
    """Emulate the float8 matmuls in high precision: for devices without float8 matmuls
    (CPU, GPUs before SM 8.9), for tests and debugging; numerically float8, not faster."""
    fsdp_float8_all_gather: bool = False
    """FSDP all-gathers the converted weights in float8 (1 byte per element) with scales
    precomputed after each optimizer step. tensorwise only; needs dp_shard (or cp) > 1."""
    grouped_experts: bool = False
    """Also train the MoE routed experts' grouped matmuls in float8 (torchao's rowwise
    grouped GEMM; each expert's token group padded to 16 rows). rowwise only; needs
    float8 matmuls and triton (no emulation exists)."""

    def validate(self) -> None:
        if self.recipe not in RECIPES:
            raise ConfigError(f"--float8.recipe {self.recipe!r} is not a float8 recipe; choose one of: "
                              + ", ".join(RECIPES))
        if self.grouped_experts and self.recipe != "rowwise":
            raise ConfigError(
                f"--float8.grouped_experts trains the experts with torchao's rowwise grouped GEMM, the only "
                f"float8 recipe it has; recipe {self.recipe} would mix recipes: use --float8.recipe rowwise, "
                "or drop the option"
            )
        if self.grouped_experts and self.emulate:
            raise ConfigError(
                "--float8.grouped_experts has no emulation (torchao's float8 grouped GEMM casts with triton "
                "kernels): drop --float8.emulate on a GPU with float8 matmuls, or drop --float8.grouped_experts"
            )
        if self.fsdp_float8_all_gather and self.recipe != "tensorwise":
            raise ConfigError(
                f"--float8.fsdp_float8_all_gather needs --float8.recipe tensorwise (one scale per weight, "
                f"agreed before the all-gather); recipe {self.recipe} scales rows: drop the option or "
                "use the tensorwise recipe"
            )


#: The float8 pair used where the device declares none (emulation): OCP e4m3 / e5m2.
DEFAULT_DTYPES = ("float8_e4m3fn", "float8_e5m2")


def torchao_config(section: Float8Config, dtypes: tuple[str, str] = DEFAULT_DTYPES):
    """torchao's ``Float8LinearConfig`` for the recipe, with the device's float8 pair
    (forward type first: e4m3fn/e5m2 on NVIDIA, e4m3fnuz/e5m2fnuz on AMD gfx942)."""
    import dataclasses

    import torch
    from torchao.float8 import Float8LinearConfig

    base = Float8LinearConfig.from_recipe_name(section.recipe)
    forward, backward = getattr(torch, dtypes[0]), getattr(torch, dtypes[1])

    def on_device(cast):  # noqa: ANN001, ANN202
        wanted: torch.dtype = backward if cast.target_dtype in (torch.float8_e5m2, torch.float8_e5m2fnuz) else forward
        return dataclasses.replace(cast, target_dtype=wanted)

    casts = ("cast_config_input", "cast_config_input_for_grad_weight", "cast_config_weight",
             "cast_config_weight_for_grad_input", "cast_config_grad_output", "cast_config_grad_output_for_grad_weight")
    return dataclasses.replace(
        base,
        **{name: on_device(getattr(base, name)) for name in casts},
        emulate=section.emulate,
        enable_fsdp_float8_all_gather=section.fsdp_float8_all_gather,
    )


def shape_rule(section: Float8Config):
    """(out_features, in_features) -> why a linear stays in high precision, or None."""

    def rule(out_features: int, in_features: int) -> str | None:
        n, k = out_features, in_features
        if k % 16 or n % 16:
            return f"in/out features {k}/{n} not multiples of 16 (float8 matmul alignment)"
        if not section.auto_filter:
            return None
        if section.recipe == "tensorwise":
            if k <= 4096 and n <= 1024:
                return "auto_filter: K <= 4096 and N <= 1024, too small to gain from tensorwise float8"
        elif n <= 2048 or k <= 1024 or (n <= 4096 and k <= 2048):
            return "auto_filter: N <= 2048, K <= 1024 or (N <= 4096 and K <= 2048), too small to gain from rowwise float8"
        return None

    return rule


#: Rows per expert group that torchao's float8 grouped GEMM needs (multiples of 16).
GROUP_ALIGNMENT = 16


def grouped_op_config(dtypes: tuple[str, str] = DEFAULT_DTYPES):  # noqa: ANN201
    """torchao's training op config for grouped experts (rowwise, the device's forward
    float8 type); MoE layers pad the token groups (``RunNeeds.moe_group_alignment``)."""
    import torch
    from torchao.prototype.moe_training.config import Float8TrainingOpConfig

    return Float8TrainingOpConfig(float8_dtype=getattr(torch, dtypes[0]), out_dtype=torch.bfloat16,
                                  pad_token_groups_for_grouped_mm=False, float8_linear_recipe="rowwise")


def experts_shape_rule(out_features: int, in_features: int) -> str | None:
    """Grouped experts: alignment only (the auto filter's thresholds are for single linears)."""
    if in_features % 16 or out_features % 16:
        return f"in/out features {in_features}/{out_features} not multiples of 16 (float8 grouped GEMM alignment)"
    return None
