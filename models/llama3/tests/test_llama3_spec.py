"""What the llama3 spec tells the core and the plugins: FLOPs, TP plan, pipeline split."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from plait.errors import ConfigError
from plait.testing import pattern_matches as _matches
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


def test_tp_plan_gives_each_projection_one_style() -> None:
    with torch.device("meta"):
        model = llama3_spec().build(TINY)
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
    """Even stages of the debug model's 6 blocks (``plait.decoder_spec``); Llama 3.2's tied
    embedding and LM head cannot be pipelined."""
    assert pipeline_split_points(FLAVORS["debugmodel"], 4) == ["layers.2", "layers.4", "layers.5"]
    with pytest.raises(ConfigError, match="tied embeddings"):
        pipeline_split_points(dataclasses.replace(FLAVORS["debugmodel"], tie_word_embeddings=True), 2)


def test_flops_count_tied_lm_head_as_weights() -> None:
    tied = dataclasses.replace(TINY, tie_word_embeddings=True)
    assert count_parameters(tied, include_embedding=False) == count_parameters(TINY, include_embedding=False)
    assert llama3_spec().flops_per_token(tied, 64) == llama3_spec().flops_per_token(TINY, 64)
