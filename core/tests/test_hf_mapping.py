"""plait.hf_mapping: a table of entries converts state dicts both ways and reports missing
and unexpected tensors in one place."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from plait.errors import CheckpointError
from plait.hf_mapping import (
    HF_DECODER_ENDS,
    HFMapping,
    InterleavedRopeRows,
    NotInHF,
    StackedExperts,
    drop_hf_layers_from,
    hf_rope,
    layer_renames,
    renames,
)


@dataclass(frozen=True)
class Args:
    n_layers: int = 2
    n_dense_layers: int = 1
    tie_word_embeddings: bool = False
    low_rank: bool = False
    num_experts: int = 3

    @property
    def moe(self):  # StackedExperts reads args.moe.num_experts
        return self


def _moe_layers(args: Args) -> range:
    return range(args.n_dense_layers, args.n_layers)


MAPPING = HFMapping(
    model="toy",
    entries=[
        *renames(HF_DECODER_ENDS),
        *layer_renames({"attention.wq.weight": "self_attn.q_proj.weight"}, when=lambda a: not a.low_rank),
        *layer_renames({"attention.wq_a.weight": "self_attn.q_a_proj.weight"}, when=lambda a: a.low_rank),
        *layer_renames({"feed_forward.w1.weight": "mlp.gate_proj.weight"}, layers=lambda a: range(a.n_dense_layers)),
        StackedExperts(layers=_moe_layers),
        NotInHF("layers.{layer}.moe.expert_bias", init=lambda a: torch.zeros(a.num_experts), layers=_moe_layers),
    ],
)


def _hf(args: Args, *, fused: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    hf = {name: torch.randn(4, 4, generator=gen) for name in HF_DECODER_ENDS.values()}
    if args.tie_word_embeddings:
        del hf["lm_head.weight"]
    query = "q_a_proj" if args.low_rank else "q_proj"
    for layer in range(args.n_layers):
        hf[f"model.layers.{layer}.self_attn.{query}.weight"] = torch.randn(4, 4, generator=gen)
    hf["model.layers.0.mlp.gate_proj.weight"] = torch.randn(6, 4, generator=gen)
    prefix = "model.layers.1.mlp.experts"
    if fused:
        hf[f"{prefix}.gate_up_proj"] = torch.randn(3, 12, 4, generator=gen)
        hf[f"{prefix}.down_proj"] = torch.randn(3, 4, 6, generator=gen)
    else:
        for e in range(3):
            for projection, shape in (("gate_proj", (6, 4)), ("up_proj", (6, 4)), ("down_proj", (4, 6))):
                hf[f"{prefix}.{e}.{projection}.weight"] = torch.randn(shape, generator=gen)
    return hf


@pytest.mark.parametrize("args", [Args(), Args(low_rank=True), Args(tie_word_embeddings=True)],
                         ids=["plain", "when", "tied"])  # fmt: skip
def test_round_trip_is_exact(args: Args) -> None:
    hf = _hf(args)
    ours = MAPPING.from_hf(hf, args)
    assert sorted(ours) == sorted(MAPPING.plait_keys(args))
    assert ours["layers.1.moe.experts.w1"].shape == (3, 6, 4)
    assert torch.equal(ours["layers.1.moe.experts.w3"][2], hf["model.layers.1.mlp.experts.2.up_proj.weight"])
    assert not ours["layers.1.moe.expert_bias"].any()
    assert ("output.weight" in ours) and (ours["output.weight"] is ours["tok_embeddings.weight"]) is args.tie_word_embeddings
    back = MAPPING.to_hf(ours, args)
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)


def test_fused_experts_read_like_per_expert_ones() -> None:
    hf = _hf(Args(), fused=True)
    ours = MAPPING.from_hf(hf, Args())
    gate, up = hf["model.layers.1.mlp.experts.gate_up_proj"].chunk(2, dim=1)
    assert torch.equal(ours["layers.1.moe.experts.w1"], gate) and torch.equal(ours["layers.1.moe.experts.w3"], up)
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in MAPPING.to_hf(ours, Args())  # export: per expert


def test_missing_and_unexpected_tensors_are_reported_once() -> None:
    hf = _hf(Args())
    del hf["model.layers.1.mlp.experts.2.down_proj.weight"], hf["model.norm.weight"]
    with pytest.raises(CheckpointError, match=r"toy: the HF checkpoint lacks 2 tensor\(s\).*experts.2.down_proj.*model.norm"):
        MAPPING.from_hf(hf, Args())
    extra = {**_hf(Args()), "model.layers.5.mlp.gate_proj.weight": torch.zeros(1),
             "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(1)}  # fmt: skip  (the latter ignored)
    with pytest.raises(CheckpointError, match=r"has 1 tensor\(s\) this model does not use: model.layers.5.mlp.gate_proj"):
        MAPPING.from_hf(extra, Args())
    ours = MAPPING.from_hf(_hf(Args()), Args())
    with pytest.raises(CheckpointError, match="does not match the model args; missing: norm.weight; unexpected: rope"):
        MAPPING.to_hf({**{k: v for k, v in ours.items() if k != "norm.weight"}, "rope": torch.zeros(1)}, Args())


def test_not_in_hf_check_refuses_export() -> None:
    def refuse(bias: torch.Tensor, layer: int) -> None:
        if bias.any():
            raise CheckpointError(f"layer {layer} has a bias")

    mapping = HFMapping(model="toy", entries=[NotInHF("layers.{layer}.b", init=lambda a: torch.zeros(2),
                                                       layers=lambda a: range(2), check=refuse)])  # fmt: skip
    ours = mapping.from_hf({}, Args())
    assert mapping.to_hf(ours, Args()) == {}
    ours["layers.1.b"] = torch.ones(2)
    with pytest.raises(CheckpointError, match="layer 1 has a bias"):
        mapping.to_hf(ours, Args())


def test_interleaved_rope_rows_is_the_llama_permutation() -> None:
    """With the whole head rotary, plait's half layout is HF's ``permute`` of Meta's weights."""
    heads, head_dim, dim = 2, 8, 5
    meta = torch.randn(heads * head_dim, dim)
    hf_permute = meta.view(heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(heads * head_dim, dim)
    rows = InterleavedRopeRows(head_dim=lambda a: head_dim, rope_dim=lambda a: head_dim)
    assert torch.equal(rows.to_plait(meta, None), hf_permute)
    assert torch.equal(rows.to_hf(rows.to_plait(meta, None), None), meta)
    partial = InterleavedRopeRows(head_dim=lambda a: head_dim, rope_dim=lambda a: 4)  # DeepSeek: last 4 rows rotary
    moved = partial.to_plait(meta, None).view(heads, head_dim, dim)
    assert torch.equal(moved[:, :4], meta.view(heads, head_dim, dim)[:, :4])
    assert torch.equal(moved[:, 4:], meta.view(heads, head_dim, dim)[:, [4, 6, 5, 7]])


def test_prepare_steps_run_before_the_entries() -> None:
    mapping = HFMapping(model="toy", entries=renames({"a": "model.a"}), prepare=(drop_hf_layers_from(lambda a: 2),))
    assert set(mapping.from_hf({"model.a": torch.ones(1), "model.layers.2.eh_proj.weight": torch.ones(1)}, Args())) == {"a"}


def test_hf_rope_reads_both_config_layouts() -> None:
    new = hf_rope({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5.0, "factor": 4.0}})
    assert (new.rope_type, new.theta, new.params["factor"]) == ("yarn", 5.0, 4.0)
    old = hf_rope({"rope_theta": 7.0, "rope_scaling": {"type": "llama3", "factor": 8.0}})
    assert (old.rope_type, old.theta) == ("llama3", 7.0)
    assert hf_rope({}) == hf_rope({"rope_scaling": None}) and hf_rope({}).rope_type == "default"
