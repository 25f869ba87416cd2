"""What the llama3 spec tells the core and the plugins: FLOPs, TP plan, pipeline split."""
from __future__ import annotations

import dataclasses
import re
import typing

import pytest
import torch
from torch import nn

from plait.errors import ConfigError
from plait.model_spec import TPStyle
from plait_llama3.model import count_parameters
from plait_llama3.spec import FLAVORS, TP_PLAN, llama3_spec, pipeline_split_points

TINY = FLAVORS["debugmodel_tiny"]


def test_spec_fields() -> None:
    spec = llama3_spec()
    assert spec.name == "llama3"
    assert spec.block_container == "layers"
    assert spec.cp_attention == "sdpa"
    assert spec.hf_adapter is not None and "LlamaForCausalLM" in spec.hf_adapter.hf_architectures
    assert spec.args_for("debugmodel") is FLAVORS["debugmodel"]


def test_context_parallel_fields_name_real_modules_and_buffers() -> None:
    spec = llama3_spec()
    with torch.device("meta"):
        model = spec.build(TINY)
    modules = dict(model.named_modules())
    for layer in range(TINY.n_layers):
        assert type(modules[f"layers.{layer}.attention.sdpa"]).__name__ == "ScaledDotProductAttention"
    assert spec.cp_attention_modules == ("layers.*.attention.sdpa",)
    buffers = dict(model.named_buffers())
    for path, seq_dim in spec.cp_sequence_buffers.items():
        assert buffers[path].shape[seq_dim] == TINY.max_seq_len  # the RoPE table, one row per position


def test_flops_per_token() -> None:
    spec = llama3_spec()
    args = FLAVORS["8B"]
    with torch.device("meta"):
        model = spec.build(args)
    non_embedding = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("tok_embeddings"))
    seq_len = 8192
    expected = 6 * non_embedding + 12 * 32 * 32 * 128 * seq_len
    assert spec.flops_per_token(args, seq_len) == expected
    # about 6 x 7.5B weights plus attention: 58 GFLOP per token at 8K context
    assert 5.7e10 < spec.flops_per_token(args, seq_len) < 5.9e10
    growth = spec.flops_per_token(args, 2 * seq_len) - spec.flops_per_token(args, seq_len)
    assert growth == 12 * 32 * 32 * 128 * seq_len


def _matches(pattern: str, path: str) -> bool:
    regex = "^" + re.escape(pattern).replace(r"\*", r"[^.]+") + "$"
    return re.match(regex, path) is not None


def test_tp_plan_names_real_modules() -> None:
    with torch.device("meta"):
        model = llama3_spec().build(TINY)
    paths = [name for name, _ in model.named_modules() if name]
    allowed = set(typing.get_args(TPStyle))
    for pattern, style in TP_PLAN.styles.items():
        assert style in allowed, pattern
        assert any(_matches(pattern, path) for path in paths), f"{pattern} matches no module"

    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith("layers.")]
    for path in linears:
        styles = {style for pattern, style in TP_PLAN.styles.items() if _matches(pattern, path)}
        assert styles in ({"colwise"}, {"rowwise"}), path
    for path, style in [("layers.1.attention.wo", "rowwise"), ("layers.0.feed_forward.w2", "rowwise"),
                        ("layers.0.feed_forward.w3", "colwise"), ("layers.1.attention_norm", "sequence_parallel")]:
        assert any(_matches(p, path) and s == style for p, s in TP_PLAN.styles.items()), path


@pytest.mark.parametrize("flavor", sorted(FLAVORS))
def test_tp_divisibility_attributes(flavor: str) -> None:
    args = FLAVORS[flavor]
    values = {name: getattr(args, name) for name in TP_PLAN.divisible_by_tp}
    assert all(isinstance(v, int) and v > 0 for v in values.values()), values
    assert values["ffn_dim"] == args.ffn_dim


def test_pipeline_split_points() -> None:
    args = FLAVORS["debugmodel"]  # 6 layers
    assert pipeline_split_points(args, 1) == []
    assert pipeline_split_points(args, 2) == ["layers.3"]
    assert pipeline_split_points(args, 4) == ["layers.2", "layers.4", "layers.5"]
    assert pipeline_split_points(args, 6) == [f"layers.{i}" for i in range(1, 6)]
    with torch.device("meta"):
        model = llama3_spec().build(args)
    modules = dict(model.named_modules())
    assert all(point in modules for point in pipeline_split_points(args, 3))

    with pytest.raises(ConfigError, match="cannot split 6 layers into 7"):
        pipeline_split_points(args, 7)
    with pytest.raises(ConfigError, match="must be positive"):
        pipeline_split_points(args, 0)
    with pytest.raises(ConfigError, match="tied embeddings"):
        pipeline_split_points(dataclasses.replace(args, tie_word_embeddings=True), 2)


def test_flops_count_tied_lm_head_as_weights() -> None:
    tied = dataclasses.replace(TINY, tie_word_embeddings=True)
    assert count_parameters(tied, include_embedding=False) == count_parameters(TINY, include_embedding=False)
    assert llama3_spec().flops_per_token(tied, 64) == llama3_spec().flops_per_token(TINY, 64)
