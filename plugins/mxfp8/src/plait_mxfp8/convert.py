"""The module swaps: chosen linears become torchao's ``MXFP8Linear`` (plain parameters,
so checkpoints and sharding see ordinary weights); chosen grouped experts get their
weights wrapped by torchao's MXFP8 training op config, which routes their grouped
matmuls through MXFP8."""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from plait_mxfp8.config import Mxfp8Config


def convert_linears(model: nn.Module, paths: set[str], section: Mxfp8Config) -> None:
    from torchao.prototype.moe_training.mxfp8_linear import MXFP8Linear
    from torchao.prototype.mx_formats.config import ScaleCalculationMode

    from plait_mxfp8.config import kernel_preference

    for path in paths:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        linear = parent.get_submodule(name)
        swapped = MXFP8Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                              kernel_preference=kernel_preference(section),
                              scale_calculation_mode=ScaleCalculationMode.RCEIL,
                              wgrad_with_hp=section.recipe == "rceil_wgrad_with_hp")
        swapped.weight, swapped.bias = linear.weight, linear.bias
        setattr(parent, name, swapped)


def convert_grouped_experts(model: nn.Module, paths: set[str], section: Mxfp8Config) -> None:
    if not paths:
        return
    from torchao.quantization import quantize_

    from plait_mxfp8.config import grouped_op_config

    config = grouped_op_config(section)
    for path in paths:
        quantize_(model.get_submodule(path), config, filter_fn=lambda module, fqn: True)
