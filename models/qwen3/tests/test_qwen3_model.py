"""The qwen3 model: sizes, initialization, forward, attention details, pipeline stages,
tied embeddings, refused options."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from plait.errors import ConfigError
from plait.nn import MoE, MoEArgs
from plait.testing import materialize
from plait_qwen3.model import ModelArgs, count_parameters
from plait_qwen3.spec import FLAVORS, qwen3_spec

TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=24, vocab_size=2048, ffn_hidden_dim=96,
                 max_seq_len=64)  # fmt: skip
TINY_MOE = dataclasses.replace(TINY, moe=MoEArgs(num_experts=4, top_k=2, hidden_dim=32, normalize_weights=True))


def _materialize(args, **options):
    return materialize(qwen3_spec(), args, **options)


# non-embedding parameters (embedding and LM head excluded) as published; the totals are
# checked by the conformance suite (test_qwen3_conformance.py)
PUBLISHED_NON_EMBEDDING = {"0.6B": 0.44, "1.7B": 1.4, "4B": 3.6, "8B": 6.95, "14B": 13.2, "32B": 31.2}


@pytest.mark.parametrize("flavor", sorted(PUBLISHED_NON_EMBEDDING))
def test_published_non_embedding_parameter_counts(flavor: str) -> None:
    args = FLAVORS[flavor]
    non_embedding = count_parameters(args, include_embedding=False) - args.vocab_size * args.dim
    assert non_embedding / 1e9 == pytest.approx(PUBLISHED_NON_EMBEDDING[flavor], abs=0.05)


@pytest.mark.parametrize(("flavor", "active_billions"), [("30B-A3B", 3.3), ("235B-A22B", 22.2)])
def test_moe_active_parameters(flavor: str, active_billions: float) -> None:
    args = FLAVORS[flavor]
    active = count_parameters(args, active_only=True)
    assert active / 1e9 == pytest.approx(active_billions, abs=0.06)
    per_expert = 3 * args.dim * args.moe.hidden_dim
    inactive = args.n_layers * (args.moe.num_experts - args.moe.top_k) * per_expert
    assert count_parameters(args) - active == inactive


def test_published_dimensions() -> None:
    for flavor in (*PUBLISHED_NON_EMBEDDING, "30B-A3B", "235B-A22B"):
        args = FLAVORS[flavor]
        assert (args.head_dim, args.vocab_size, args.rope_theta, args.norm_eps) == (128, 151936, 1e6, 1e-6)
        assert args.tie_word_embeddings is (flavor in ("0.6B", "1.7B", "4B"))
    for flavor in ("30B-A3B", "235B-A22B"):
        moe = FLAVORS[flavor].moe
        assert (moe.num_experts, moe.top_k, moe.normalize_weights, moe.score_func) == (128, 8, True, "softmax")
    assert (FLAVORS["30B-A3B"].moe.hidden_dim, FLAVORS["235B-A22B"].moe.hidden_dim) == (768, 1536)


def test_debug_flavors_fit_the_embedded_tokenizer() -> None:
    dense, moe = FLAVORS["debugmodel"], FLAVORS["debugmodel_moe"]
    assert dense.vocab_size == moe.vocab_size == 2048
    assert dense.moe is None and moe.moe is not None
    assert dense.n_heads * dense.head_dim != dense.dim  # the explicit head_dim matters
    assert not dense.tie_word_embeddings  # so that the tp plugin accepts it


@pytest.mark.parametrize("args", [TINY, TINY_MOE, dataclasses.replace(TINY, tie_word_embeddings=True)],
                         ids=["dense", "moe", "tied"])  # fmt: skip
def test_init_weights_covers_every_tensor(args: ModelArgs) -> None:
    model = _materialize(args, poison=True)

    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert torch.isfinite(tensor).all(), f"{name} was not initialized"
    attention = model.layers["1"].attention
    assert torch.equal(attention.q_norm.weight, torch.ones(args.head_dim))
    assert model.rope_cache.shape == (args.max_seq_len, 2 * args.head_dim)
    if args.moe is not None:
        assert not model.layers["0"].moe.expert_bias.any()
        assert model.layers["0"].moe.experts.w1.std().item() == pytest.approx(0.02, rel=0.2)


def test_attention_normalizes_each_head_before_rope_and_scales_by_head_dim() -> None:
    """Against a direct computation: per-head RMSNorm, rotate-half RoPE, softmax(q k / sqrt(head_dim))."""
    model = _materialize(TINY, seed=1)
    attention = model.layers["0"].attention
    with torch.no_grad():
        attention.q_norm.weight.uniform_(0.5, 1.5)
        attention.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(1, 5, TINY.dim)
    head_dim, seq = TINY.head_dim, 5

    def heads(linear, norm):
        h = linear(x).view(1, seq, -1, head_dim)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + TINY.norm_eps) * norm.weight
        cos, sin = model.rope_cache[:seq].unsqueeze(1).chunk(2, dim=-1)
        return h * cos + torch.cat([-h[..., head_dim // 2:], h[..., : head_dim // 2]], dim=-1) * sin

    q = heads(attention.wq, attention.q_norm).transpose(1, 2)
    k = heads(attention.wk, attention.k_norm).repeat_interleave(2, dim=2).transpose(1, 2)
    v = attention.wv(x).view(1, seq, -1, head_dim).repeat_interleave(2, dim=2).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) / head_dim**0.5
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    expected = attention.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, seq, -1))

    torch.testing.assert_close(attention(x, rope_cache=model.rope_cache), expected, rtol=1e-5, atol=1e-6)
    assert attention.sdpa.scale == head_dim**-0.5 != (TINY.dim // TINY.n_heads) ** -0.5


def test_moe_blocks_replace_the_dense_feed_forward() -> None:
    model = _materialize(TINY_MOE)
    block = model.layers["0"]
    assert block.feed_forward is None and isinstance(block.moe, MoE)
    assert block.moe.experts.w1.shape == (4, 32, TINY.dim)
    model.train()
    model(torch.randint(0, 2048, (2, 6))).sum().backward()
    assert block.moe.tokens_per_expert.sum() == 2 * 6 * 2
    assert block.moe.experts.w2.grad is not None and block.moe.router.gate.weight.grad is not None


def test_tied_embeddings_survive_materialization_and_train_together() -> None:
    args = dataclasses.replace(TINY, tie_word_embeddings=True)
    model = _materialize(args)
    assert model.output.weight is model.tok_embeddings.weight
    assert sum(p.numel() for p in model.parameters()) == count_parameters(args)
    F.cross_entropy(model(torch.randint(0, 2048, (1, 4))).flatten(0, 1), torch.zeros(4, dtype=torch.long)).backward()
    assert model.tok_embeddings.weight.grad is not None


def test_invalid_args_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="multiple of n_kv_heads"):
        ModelArgs(n_heads=6, n_kv_heads=4)
    with pytest.raises(ConfigError, match="head_dim \\(15\\) must be even"):
        ModelArgs(head_dim=15)
    with pytest.raises(ConfigError, match="attention_mask 'block_causal'.*not supported.*causal SDPA"):
        ModelArgs(attention_mask="block_causal")
