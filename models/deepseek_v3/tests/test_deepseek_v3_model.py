"""The deepseek_v3 model: sizes, dense-first blocks, latent attention, YaRN, routing,
initialization, causality."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from plait.nn import MoE
from plait.testing import materialize
from plait_deepseek_v3.model import count_parameters
from plait_deepseek_v3.rope import Yarn, rope_table, yarn_inv_freq
from plait_deepseek_v3.spec import FLAVORS, deepseek_v3_spec

DEBUG = FLAVORS["debugmodel"]
#: The debug flavor, narrower, with a low-rank query projection and YaRN active.
TINY = dataclasses.replace(
    DEBUG, dim=64, inter_dim=96, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=12, original_seq_len=16, rope_factor=4.0, max_seq_len=64,
    moe=dataclasses.replace(DEBUG.moe, hidden_dim=32),
)  # fmt: skip


def _materialize(args, **options):
    return materialize(deepseek_v3_spec(), args, **options)


@pytest.mark.parametrize(
    ("flavor", "total_billions", "active_billions"),
    [("671B", 671.0, 37.6), ("16B", 15.7, 2.7)],  # active: with the embedding row a token reads
)
def test_published_parameter_counts(flavor: str, total_billions: float, active_billions: float) -> None:
    args = FLAVORS[flavor]
    model = deepseek_v3_spec().build_meta(args)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == count_parameters(args)
    assert round(n_params / 1e9, 1) == total_billions
    assert round(count_parameters(args, active_only=True) / 1e9, 1) == active_billions


@pytest.mark.parametrize("flavor", sorted(FLAVORS))
def test_count_parameters_matches_meta_build(flavor: str) -> None:
    args = FLAVORS[flavor]
    model = deepseek_v3_spec().build_meta(args)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(args)
    embedding = model.tok_embeddings.weight.numel()
    assert count_parameters(args, include_embedding=False) == count_parameters(args) - embedding
    moe = args.moe
    inactive_experts = (moe.num_experts - moe.top_k) * 3 * args.dim * moe.hidden_dim * args.n_moe_layers
    assert count_parameters(args, active_only=True) == count_parameters(args) - inactive_experts


def test_published_flavor_fields() -> None:
    v3 = FLAVORS["671B"]
    assert (v3.dim, v3.n_layers, v3.n_dense_layers, v3.n_heads, v3.inter_dim, v3.vocab_size) == (
        7168, 61, 3, 128, 18432, 129280)  # fmt: skip
    assert (v3.q_lora_rank, v3.kv_lora_rank, v3.qk_nope_head_dim, v3.qk_rope_head_dim, v3.v_head_dim) == (
        1536, 512, 128, 64, 128)  # fmt: skip
    assert v3.moe == dataclasses.replace(
        v3.moe, num_experts=256, top_k=8, num_shared_experts=1, hidden_dim=2048, num_groups=8, topk_groups=4,
        score_func="sigmoid", normalize_weights=True, route_scale=2.5,
    )  # fmt: skip
    assert (v3.rope_theta, v3.rope_factor, v3.original_seq_len, v3.beta_fast, v3.beta_slow, v3.mscale) == (
        10000.0, 40.0, 4096, 32.0, 1.0, 1.0)  # fmt: skip
    lite = FLAVORS["16B"]
    assert (lite.dim, lite.n_layers, lite.n_dense_layers, lite.q_lora_rank, lite.kv_lora_rank) == (2048, 27, 1, 0, 512)
    assert (lite.moe.num_experts, lite.moe.top_k, lite.moe.num_shared_experts) == (64, 6, 2)


def test_debug_flavor_is_dense_first_then_group_limited_moe() -> None:
    assert DEBUG.vocab_size == 2048  # the embedded tokenizer
    assert DEBUG.moe.group_limited and DEBUG.moe.score_func == "sigmoid"
    model = deepseek_v3_spec().build_meta(DEBUG)
    kinds = ["dense" if block.feed_forward is not None else "moe" for block in model.layers.values()]
    assert kinds == ["dense", "moe", "moe", "moe"]
    assert all((block.moe is None) == (block.feed_forward is not None) for block in model.layers.values())
    assert model.layers["0"].attention.wq is not None and model.layers["0"].attention.wq_a is None


def test_group_limited_routing_keeps_each_token_in_its_best_groups() -> None:
    model = _materialize(DEBUG)
    router = model.layers["1"].moe.router
    tokens = torch.randn(512, DEBUG.dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        routing = router(tokens)
    groups = routing.experts // DEBUG.moe.experts_per_group
    groups_per_token = [len(set(row)) for row in groups.tolist()]
    assert max(groups_per_token) == DEBUG.moe.topk_groups  # at most 2 of the 4 groups ...
    assert len(set(groups.flatten().tolist())) == DEBUG.moe.num_groups  # ... chosen per token
    unlimited = dataclasses.replace(DEBUG.moe, topk_groups=DEBUG.moe.num_groups)
    unlimited_router = type(router)(dim=DEBUG.dim, args=unlimited)
    unlimited_router.load_state_dict(router.state_dict())
    with torch.no_grad():
        free = unlimited_router(tokens).experts // DEBUG.moe.experts_per_group
    assert max(len(set(row)) for row in free.tolist()) == 3  # without the limit, tokens spread over 3 groups


def test_yarn_softmax_scale() -> None:
    v3 = FLAVORS["671B"]
    assert v3.yarn is None  # pretraining context: no stretch, plain scale
    assert v3.softmax_scale == 192**-0.5
    long = dataclasses.replace(v3, max_seq_len=163840)
    mscale = 0.1 * 1.0 * math.log(40) + 1
    assert long.yarn == Yarn(factor=40.0, original_seq_len=4096, beta_fast=32.0, beta_slow=1.0, mscale=1.0)
    assert long.softmax_scale == pytest.approx(192**-0.5 * mscale**2, rel=1e-15)
    lite = dataclasses.replace(FLAVORS["16B"], max_seq_len=8192)
    assert lite.softmax_scale == pytest.approx(192**-0.5 * (0.1 * 0.707 * math.log(40) + 1) ** 2, rel=1e-15)
    assert Yarn(factor=1.0, original_seq_len=4096).softmax_mscale == 1.0


def test_yarn_stretches_only_the_slow_frequencies() -> None:
    yarn = Yarn(factor=40.0, original_seq_len=4096)
    plain = 1.0 / (10000.0 ** (torch.arange(0, 64, 2).float() / 64))
    stretched = yarn_inv_freq(64, theta=10000.0, yarn=yarn)
    ratio = plain / stretched
    assert torch.allclose(ratio[:10], torch.ones(10))  # fast: kept (extrapolated)
    assert torch.allclose(ratio[-8:], torch.full((8,), 40.0))  # slow: divided by the factor
    assert bool((ratio[1:] >= ratio[:-1] - 1e-6).all())  # a monotone blend in between
    table = rope_table(64, 10, theta=10000.0, yarn=yarn)
    angles = torch.outer(torch.arange(10).float(), stretched)
    assert torch.allclose(table[:, :32], angles.cos()) and torch.allclose(table[:, 96:], angles.sin())


def test_yarn_matches_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.DeepseekV3Config(
        max_position_embeddings=163840,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32, "beta_slow": 1,
                         "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096},
    )  # fmt: skip
    theirs, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    ours = yarn_inv_freq(64, theta=10000.0, yarn=dataclasses.replace(FLAVORS["671B"], max_seq_len=163840).yarn)
    assert attention_factor == 1.0
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


def test_init_weights_covers_every_tensor() -> None:
    model = _materialize(TINY, poison=True)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert not tensor.isnan().any(), name
    assert torch.equal(model.rope_cache, rope_table(8, 64, theta=TINY.rope_theta, yarn=TINY.yarn))
    moe_layers = [m for m in model.modules() if isinstance(m, MoE)]
    assert len(moe_layers) == TINY.n_layers - 1 and not any(m.expert_bias.any() for m in moe_layers)
    assert _materialize(TINY, seed=0).state_dict()["layers.2.attention.wkv_b.weight"].equal(
        model.state_dict()["layers.2.attention.wkv_b.weight"]
    )


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_forward_backward_reaches_every_parameter(q_lora_rank: int) -> None:
    args = dataclasses.replace(TINY, q_lora_rank=q_lora_rank)
    model = _materialize(args)
    tokens = torch.randint(0, args.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    logits = model(tokens)
    assert logits.shape == (2, 32, args.vocab_size)
    logits.float().pow(2).mean().backward()
    for name, param in model.named_parameters():
        if ".moe.experts." in name:  # only the experts some token chose get a gradient row
            assert param.grad is not None and param.grad.abs().sum() > 0, name
            continue
        assert param.grad is not None and param.grad.abs().amax() > 0, name


def test_attention_is_causal_and_uses_the_explicit_scale() -> None:
    model = _materialize(TINY).eval()
    tokens = torch.randint(0, TINY.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[0, 16:] = (changed[0, 16:] + 1) % TINY.vocab_size
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    assert torch.allclose(before[0, :16], after[0, :16], atol=1e-6)
    assert not torch.allclose(before[0, 16:], after[0, 16:])
    sdpa = model.layers["0"].attention.sdpa
    assert sdpa.scale == TINY.softmax_scale != TINY.qk_head_dim**-0.5  # YaRN is active in TINY
    with torch.no_grad():
        sdpa.scale = TINY.qk_head_dim**-0.5
        assert not torch.allclose(model(tokens), before)


def test_args_are_checked() -> None:
    from plait.errors import ConfigError

    with pytest.raises(ConfigError, match="n_dense_layers \\(5\\) must be between 0 and n_layers \\(4\\)"):
        dataclasses.replace(DEBUG, n_dense_layers=5)
    with pytest.raises(ConfigError, match="qk_rope_head_dim \\(7\\) must be even"):
        dataclasses.replace(DEBUG, qk_rope_head_dim=7)
    with pytest.raises(ConfigError, match="kv_lora_rank \\(0\\) positive"):
        dataclasses.replace(DEBUG, kv_lora_rank=0)
