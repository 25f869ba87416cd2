"""What the qwen3 spec tells the core and the plugins: FLOPs, TP plan, pipeline split,
context-parallel attention, expert modules."""
from __future__ import annotations


import pytest
import torch
from torch import nn

from plait.errors import ConfigError
from plait.testing import pattern_matches as _matches
from plait_qwen3.model import count_parameters
from plait_qwen3.spec import FLAVORS, TP_PLAN, pipeline_split_points, qwen3_spec


def _meta_model(flavor: str) -> nn.Module:
    with torch.device("meta"):
        return qwen3_spec().build(FLAVORS[flavor])


def test_spec_fields() -> None:
    spec = qwen3_spec()
    assert spec.name == "qwen3"
    assert spec.block_container == "layers"
    assert spec.cp_attention == "sdpa"
    assert set(spec.hf_adapter.hf_architectures) == {"Qwen3ForCausalLM", "Qwen3MoeForCausalLM"}
    assert spec.args_for("debugmodel_moe") is FLAVORS["debugmodel_moe"]


def test_flops_per_token_dense() -> None:
    spec, args, seq_len = qwen3_spec(), FLAVORS["8B"], 4096
    model = _meta_model("8B")
    non_embedding = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("tok_embeddings"))
    attention = 12 * 36 * 32 * 128 * seq_len
    assert spec.flops_per_token(args, seq_len) == 6 * non_embedding + attention


def test_flops_per_token_counts_only_the_active_experts() -> None:
    spec, args, seq_len = qwen3_spec(), FLAVORS["30B-A3B"], 4096
    model = _meta_model("30B-A3B")
    experts = sum(p.numel() for name, p in model.named_parameters() if ".moe.experts." in name)
    other = sum(p.numel() for name, p in model.named_parameters()
                if ".moe.experts." not in name and not name.startswith("tok_embeddings"))  # fmt: skip
    active_experts = experts * args.moe.top_k // args.moe.num_experts
    attention = 12 * 48 * 32 * 128 * seq_len
    assert spec.flops_per_token(args, seq_len) == 6 * (other + active_experts) + attention
    # about 6 x 3B active weights: an order of magnitude below the 30B a dense model would cost
    assert spec.flops_per_token(args, seq_len) < 6 * count_parameters(args) / 5


def test_tp_plan_gives_each_projection_one_style() -> None:
    models = [_meta_model("debugmodel"), _meta_model("debugmodel_moe")]
    def styles_of(path: str) -> set[str]:
        return {style for pattern, style in TP_PLAN.styles.items() if _matches(pattern, path)}

    for model in models:
        for path, module in model.named_modules():
            if isinstance(module, nn.Linear) and path.startswith("layers.") and ".moe." not in path:
                assert styles_of(path) in ({"colwise"}, {"rowwise"}), path
            if ".moe." in path:
                assert not styles_of(path), path  # the moe style covers the whole layer
            if path.endswith(".moe"):
                assert styles_of(path) == {"moe"}, path


@pytest.mark.parametrize("flavor", sorted(FLAVORS))
def test_tp_divisibility_attributes(flavor: str) -> None:
    args = FLAVORS[flavor]
    values = {name: getattr(args, name) for name in TP_PLAN.divisible_by_tp if "." not in name}
    assert all(isinstance(v, int) and v > 0 for v in values.values()), values
    if args.moe is not None:
        assert "moe.hidden_dim" in TP_PLAN.divisible_by_tp and args.moe.hidden_dim > 0
    assert (values["n_heads"], values["kv_heads"]) == (args.n_heads, args.n_kv_heads)


def test_expert_modules_are_the_grouped_experts_of_moe_flavors() -> None:
    (pattern,) = qwen3_spec().expert_modules
    moe_paths = [name for name, _ in _meta_model("debugmodel_moe").named_modules() if _matches(pattern, name)]
    assert moe_paths == [f"layers.{i}.moe.experts" for i in range(4)]
    assert not [name for name, _ in _meta_model("debugmodel").named_modules() if _matches(pattern, name)]


def test_pipeline_split_points_of_published_flavors() -> None:
    with pytest.raises(ConfigError, match="tied embeddings"):
        pipeline_split_points(FLAVORS["0.6B"], 2)
    assert pipeline_split_points(FLAVORS["235B-A22B"], 8)[0] == "layers.12"  # 94 = 6 x 12 + 2 x 11
