"""What the deepseek_v3 spec tells the core and the plugins: FLOPs, TP plan, pipeline
split, expert modules."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from plait.errors import ConfigError
from plait.nn import GroupedExperts
from plait.testing import pattern_matches as _matches
from plait_deepseek_v3.spec import FLAVORS, TP_PLAN, deepseek_v3_spec, pipeline_split_points

DEBUG = FLAVORS["debugmodel"]


def test_spec_fields() -> None:
    spec = deepseek_v3_spec()
    assert spec.name == "deepseek_v3"
    assert spec.block_container == "layers"
    assert spec.cp_attention is None  # refused by the context_parallel plugin
    assert spec.hf_adapter is not None and spec.hf_adapter.hf_architectures == ("DeepseekV3ForCausalLM",)
    assert spec.args_for("671B") is FLAVORS["671B"]
    assert set(FLAVORS) == {"debugmodel", "debugmodel_q_lora", "16B", "671B"}


def _active_weights(model: torch.nn.Module, args) -> int:
    """Weights one token uses, from the built modules: all but the embedding and the
    experts it is not routed to."""
    total = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("tok_embeddings"))
    moe = args.moe
    per_expert = 3 * args.dim * moe.hidden_dim
    return total - args.n_moe_layers * (moe.num_experts - moe.top_k) * per_expert


@pytest.mark.parametrize("flavor", ["671B", "16B"])
def test_flops_per_token_counts_active_parameters(flavor: str) -> None:
    spec = deepseek_v3_spec()
    args = FLAVORS[flavor]
    with torch.device("meta"):
        model = spec.build(args)
    seq_len = 4096
    attention = 6 * args.n_layers * args.n_heads * (192 + 128) * seq_len
    assert spec.flops_per_token(args, seq_len) == 6 * _active_weights(model, args) + attention
    growth = spec.flops_per_token(args, 2 * seq_len) - spec.flops_per_token(args, seq_len)
    assert growth == attention


def test_flops_per_token_of_the_published_model() -> None:
    # 6 x 36.6B active weights (37.6B less the embedding) = 2.2e11, plus attention at 4K:
    # 6 x 61 layers x 128 heads x (192 + 128) x 4096 = 0.6e11
    flops = deepseek_v3_spec().flops_per_token(FLAVORS["671B"], 4096)
    assert 2.75e11 < flops < 2.85e11
    more_experts = dataclasses.replace(FLAVORS["671B"], moe=dataclasses.replace(FLAVORS["671B"].moe, num_experts=512))
    router_rows = 6 * 58 * 7168 * 256  # idle experts cost no FLOPs; only the router grows
    assert deepseek_v3_spec().flops_per_token(more_experts, 4096) == flops + router_rows


def test_tp_plan_names_real_modules() -> None:
    paths = set()
    for q_lora_rank in (0, 64):  # wq in one variant, wq_b in the other
        with torch.device("meta"):
            model = deepseek_v3_spec().build(dataclasses.replace(DEBUG, q_lora_rank=q_lora_rank))
        paths |= {name for name, _ in model.named_modules() if name}
    for attribute in TP_PLAN.divisible_by_tp:
        value = FLAVORS["671B"]
        for part in attribute.split("."):
            value = getattr(value, part)
        assert isinstance(value, int), attribute

    def styles_of(path: str) -> set[str]:
        return {style for pattern, style in TP_PLAN.styles.items() if _matches(pattern, path)}

    latent = [path for path in paths if path.endswith(("attention.wq_a", "attention.wkv_a", "q_norm", "kv_norm"))]
    assert latent and all(styles_of(path) == {"replicate"} for path in latent)
    moe_layers = [path for path in paths if path.endswith(".moe")]
    assert moe_layers and all(styles_of(path) == {"moe"} for path in moe_layers)
    assert not any(styles_of(path) for path in paths if ".moe." in path)  # the moe style covers the whole layer
    assert all(styles_of(path) == {"sum_gradient"} for path in paths if path.endswith("rope_key"))


def test_expert_modules_are_the_grouped_experts() -> None:
    spec = deepseek_v3_spec()
    with torch.device("meta"):
        model = spec.build(DEBUG)
    experts = [name for name, module in model.named_modules() if isinstance(module, GroupedExperts)]
    assert experts == ["layers.1.moe.experts", "layers.2.moe.experts", "layers.3.moe.experts"]
    (pattern,) = spec.expert_modules
    assert [name for name, _ in model.named_modules() if _matches(pattern, name)] == experts


def test_pipeline_split_points() -> None:
    assert pipeline_split_points(DEBUG, 1) == []
    assert pipeline_split_points(DEBUG, 2) == ["layers.2"]
    assert pipeline_split_points(DEBUG, 4) == ["layers.1", "layers.2", "layers.3"]
    v3 = FLAVORS["671B"]
    points = pipeline_split_points(v3, 8)  # 61 layers: five stages of 8, three of 7
    assert points == ["layers.8", "layers.16", "layers.24", "layers.32", "layers.40", "layers.47", "layers.54"]
    with pytest.raises(ConfigError, match="cannot split 4 layers into 5 pipeline stages"):
        pipeline_split_points(DEBUG, 5)
    with pytest.raises(ConfigError, match="must be positive"):
        pipeline_split_points(DEBUG, 0)
