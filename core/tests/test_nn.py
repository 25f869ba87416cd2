"""The shared building blocks against direct references written from their definitions."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from plait.nn import (
    Attention,
    FeedForward,
    RMSNorm,
    RopeScaling,
    apply_rope,
    rope_cache,
    rope_inv_freq,
    swiglu_hidden_dim,
)


def _scaled_frequency(freq: float, s: RopeScaling) -> float:
    """Llama 3.1 scaling of one frequency, straight from its definition."""
    wavelength = 2 * math.pi / freq
    if wavelength < s.original_max_position_embeddings / s.high_freq_factor:
        return freq
    if wavelength > s.original_max_position_embeddings / s.low_freq_factor:
        return freq / s.factor
    smooth = (s.original_max_position_embeddings / wavelength - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    return (1 - smooth) * freq / s.factor + smooth * freq


@pytest.mark.parametrize(
    "scaling",
    [
        RopeScaling(),
        RopeScaling(factor=4.0, low_freq_factor=2.0, high_freq_factor=8.0, original_max_position_embeddings=512),
    ],
)
def test_rope_scaling_matches_definition(scaling: RopeScaling) -> None:
    head_dim, theta = 128, 500000.0
    plain = [1.0 / theta ** (i / head_dim) for i in range(0, head_dim, 2)]
    expected = torch.tensor([_scaled_frequency(f, scaling) for f in plain], dtype=torch.float64)

    got = rope_inv_freq(head_dim, theta=theta, scaling=scaling).double()

    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0.0)
    unscaled = rope_inv_freq(head_dim, theta=theta).double()
    assert torch.equal(got[:4], unscaled[:4]), "high frequencies must be kept"
    torch.testing.assert_close(got[-1], unscaled[-1] / scaling.factor)
    band = [(u / scaling.factor < g < u) for g, u in zip(got.tolist(), unscaled.tolist())]
    assert any(band), "some frequencies must fall in the smoothly interpolated band"


def test_apply_rope_rotates_feature_pairs() -> None:
    torch.manual_seed(0)
    head_dim, seq_len = 8, 5
    cache = rope_cache(head_dim, 16, theta=10000.0)
    x = torch.randn(2, seq_len, 3, head_dim)
    inv_freq = rope_inv_freq(head_dim, theta=10000.0)

    expected = torch.empty_like(x)
    half = head_dim // 2
    for pos in range(seq_len):
        for i in range(half):
            angle = pos * inv_freq[i].item()
            a, b = x[:, pos, :, i], x[:, pos, :, i + half]
            expected[:, pos, :, i] = a * math.cos(angle) - b * math.sin(angle)
            expected[:, pos, :, i + half] = a * math.sin(angle) + b * math.cos(angle)

    torch.testing.assert_close(apply_rope(x, cache), expected, rtol=1e-5, atol=1e-6)


def test_rope_scores_depend_only_on_relative_position() -> None:
    torch.manual_seed(0)
    head_dim = 16
    cache = rope_cache(head_dim, 64, theta=500000.0, scaling=RopeScaling(original_max_position_embeddings=32))
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def score(q_pos: int, k_pos: int) -> float:
        seq = torch.zeros(1, 64, 1, head_dim)
        seq[0, q_pos, 0], seq[0, k_pos, 0] = q, k
        rotated = apply_rope(seq, cache)[0, :, 0]
        return float(rotated[q_pos] @ rotated[k_pos])

    assert score(10, 3) == pytest.approx(score(40, 33), rel=1e-4)
    assert score(10, 3) != pytest.approx(score(10, 4), rel=1e-3)


def test_rope_errors() -> None:
    with pytest.raises(ValueError, match="even head dimension"):
        rope_cache(7, 8, theta=10000.0)
    with pytest.raises(ValueError, match="max_seq_len"):
        apply_rope(torch.zeros(1, 9, 1, 4), rope_cache(4, 8, theta=10000.0))


def test_rms_norm() -> None:
    torch.manual_seed(0)
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 4, 8)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    assert norm(x.bfloat16()).dtype == torch.float32  # fp32 weight promotes, as in mixed precision
    norm.reset_parameters()
    assert torch.equal(norm.weight, torch.ones(8))


def test_swiglu_width_and_forward() -> None:
    # published widths of the Llama 3.1 sizes
    assert swiglu_hidden_dim(4096, multiple_of=1024, ffn_dim_multiplier=1.3) == 14336
    assert swiglu_hidden_dim(8192, multiple_of=4096, ffn_dim_multiplier=1.3) == 28672
    assert swiglu_hidden_dim(16384, multiple_of=4096, ffn_dim_multiplier=1.2) == 53248
    assert swiglu_hidden_dim(256, multiple_of=256) == 768

    torch.manual_seed(0)
    ffn = FeedForward(dim=6, hidden_dim=10)
    x = torch.randn(2, 3, 6)
    expected = (F.silu(x @ ffn.w1.weight.T) * (x @ ffn.w3.weight.T)) @ ffn.w2.weight.T
    torch.testing.assert_close(ffn(x), expected)


def _reference_attention(attn: Attention, x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """Per-head causal attention with an explicit mask; kv head j serves query heads j*g..j*g+g-1."""
    batch, seq_len, _ = x.shape
    hd = attn.head_dim
    q = apply_rope((x @ attn.wq.weight.T).view(batch, seq_len, -1, hd), cache)
    k = apply_rope((x @ attn.wk.weight.T).view(batch, seq_len, -1, hd), cache)
    v = (x @ attn.wv.weight.T).view(batch, seq_len, -1, hd)
    group = q.shape[2] // k.shape[2]
    mask = torch.ones(seq_len, seq_len).tril().bool()
    heads = []
    for h in range(q.shape[2]):
        scores = q[:, :, h] @ k[:, :, h // group].transpose(1, 2) / math.sqrt(hd)
        weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        heads.append(weights @ v[:, :, h // group])
    return torch.cat(heads, dim=-1) @ attn.wo.weight.T


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_attention_matches_reference(n_kv_heads: int) -> None:
    torch.manual_seed(0)
    attn = Attention(dim=32, n_heads=4, n_kv_heads=n_kv_heads)
    assert attn.wk.weight.shape == (n_kv_heads * 8, 32)
    cache = rope_cache(8, 16, theta=10000.0)
    x = torch.randn(2, 7, 32)

    out = attn(x, rope_cache=cache)

    assert out.shape == (2, 7, 32)
    torch.testing.assert_close(out, _reference_attention(attn, x, cache), rtol=1e-5, atol=1e-5)


def test_bf16_attention_on_cpu_runs_in_fp32_under_autocast() -> None:
    """bf16 q, k, v (autocast or not) attend through the fp32 kernel, faster on CPU: the
    output is the fp32 attention of the bf16 inputs rounded once, and the gradients flow."""
    from plait.nn.attention import ScaledDotProductAttention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ScaledDotProductAttention()(q, k, v)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)
    out.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16 and q.grad.abs().sum() > 0


def test_bf16_attention_on_cpu_stays_bf16_where_that_is_faster() -> None:
    """From 1,024 positions (or long sequences of wide heads) torch's bf16 CPU kernel is the
    faster one: the inputs go to it as they are."""
    from plait.nn.attention import ScaledDotProductAttention, _fp32_is_faster_on_cpu

    assert _fp32_is_faster_on_cpu(256, 16) and _fp32_is_faster_on_cpu(256, 64) and _fp32_is_faster_on_cpu(512, 32)
    assert not _fp32_is_faster_on_cpu(1024, 16) and not _fp32_is_faster_on_cpu(256, 128)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 1024, 16, dtype=torch.bfloat16) for _ in range(3))
    out = ScaledDotProductAttention()(q, k, v)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_attention_is_causal() -> None:
    torch.manual_seed(0)
    attn = Attention(dim=16, n_heads=2)
    cache = rope_cache(8, 16, theta=10000.0)
    x = torch.randn(1, 6, 16)
    changed = x.clone()
    changed[:, 4:] = torch.randn(1, 2, 16)
    out, out_changed = attn(x, rope_cache=cache), attn(changed, rope_cache=cache)
    torch.testing.assert_close(out[:, :4], out_changed[:, :4])
    assert not torch.allclose(out[:, 4:], out_changed[:, 4:])


def test_attention_heads_shard_like_tensor_parallel() -> None:
    """Each rank holds a slice of the heads (column-sharded wq/wk/wv, row-sharded wo); the
    partial outputs add up to the full one, so the module needs no head count of its own."""
    torch.manual_seed(0)
    dim, n_heads, n_kv, hd, tp = 32, 4, 2, 8, 2
    full = Attention(dim=dim, n_heads=n_heads, n_kv_heads=n_kv)
    cache = rope_cache(hd, 16, theta=10000.0)
    x = torch.randn(2, 5, dim)

    total = torch.zeros(2, 5, dim)
    for rank in range(tp):
        part = Attention(dim=dim, n_heads=n_heads // tp, n_kv_heads=n_kv // tp, head_dim=hd)
        q_rows = slice(rank * n_heads // tp * hd, (rank + 1) * n_heads // tp * hd)
        kv_rows = slice(rank * n_kv // tp * hd, (rank + 1) * n_kv // tp * hd)
        with torch.no_grad():
            part.wq.weight.copy_(full.wq.weight[q_rows])
            part.wk.weight.copy_(full.wk.weight[kv_rows])
            part.wv.weight.copy_(full.wv.weight[kv_rows])
            part.wo.weight.copy_(full.wo.weight[:, q_rows])
        total += part(x, rope_cache=cache)

    torch.testing.assert_close(total, full(x, rope_cache=cache), rtol=1e-5, atol=1e-5)


def test_attention_rejects_uneven_groups() -> None:
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        Attention(dim=24, n_heads=6, n_kv_heads=4)
