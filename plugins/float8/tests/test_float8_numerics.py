"""float8 numerics against the high-precision module, by signal-to-quantization-noise ratio
(SQNR, dB), per recipe, with torchao's own thresholds: output >= 25 dB, gradients >= 17-20 dB
(measured figures in docs/low-precision.md). Emulated matmuls: the float8 casts and scales
are the real ones; only the matmul runs in high precision."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from plait.testing import linear_sqnr, materialize, sqnr
from plait_float8.config import Float8Config, torchao_config
from plait_float8.plugin import decisions_for
from plait.low_precision import converted_paths

RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
OUTPUT_SQNR = 25.0
#: torchao's bounds: 20 dB for tensorwise gradients, 17 dB where gradients are cast rowwise to e4m3.
GRADIENT_SQNR = {"tensorwise": 20.0, "rowwise": 17.0, "rowwise_with_gw_hp": 17.0}


def float8_copy(module: nn.Module, recipe: str, **options: object) -> nn.Module:
    from torchao.float8 import convert_to_float8_training

    section = Float8Config(recipe=recipe, emulate=True, auto_filter=False, **options)
    converted = copy.deepcopy(module)
    chosen = converted_paths(decisions_for(converted, section))
    convert_to_float8_training(converted, module_filter_fn=lambda m, path: path in chosen,
                               config=torchao_config(section))
    return converted


@pytest.mark.parametrize("recipe", RECIPES)
def test_linear_sqnr(recipe):
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(512, 256, bias=False))
    converted = float8_copy(reference, recipe)
    assert type(converted[0]).__name__ == "Float8Linear"
    measured = linear_sqnr(reference, converted, torch.randn(256, 512), torch.randn(256, 256))
    assert measured["output"] >= OUTPUT_SQNR
    assert measured["input grad"] >= GRADIENT_SQNR[recipe]
    assert measured["weight grad"] >= GRADIENT_SQNR[recipe]
    assert measured["output"] < 60  # float8 is in effect
    if recipe == "rowwise_with_gw_hp":
        assert measured["weight grad"] > 100  # the weight gradient stays in high precision


@pytest.fixture(scope="module")
def debug_model():
    from plait_llama3.spec import llama3_spec

    spec = llama3_spec()
    return materialize(spec, spec.args_for("debugmodel_tiny"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_debug_model_sqnr(debug_model, recipe):
    """Every linear of the tiny llama3 but the LM head in float8: logits and every weight's
    gradient against the same model in float32."""
    converted = float8_copy(debug_model, recipe)
    tokens = torch.randint(0, 2048, (2, 64), generator=torch.Generator().manual_seed(1))
    grads = []
    logits = []
    for model in (debug_model, converted):
        model.zero_grad()
        out = model(tokens)
        nn.functional.cross_entropy(out.flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
        logits.append(out.detach())
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert sqnr(*logits) >= OUTPUT_SQNR
    converted_weights = [name for name, m in converted.named_modules() if type(m).__name__ == "Float8Linear"]
    assert len(converted_weights) == 14
    worst = min(sqnr(grads[0][f"{name}.weight"], grads[1][f"{name}.weight"]) for name in converted_weights)
    assert worst >= GRADIENT_SQNR[recipe], worst
