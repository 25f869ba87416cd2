"""Hugging Face interop: logits match transformers' Qwen3 and Qwen3-MoE when loading and
after exporting; the expert layouts HF folders use are all read."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import plait
from plait.errors import CheckpointError, ConfigError
from plait.testing import materialize, randomize_parameters as _randomize
from plait.hf import load_hf_folder
from plait.nn import MoEArgs
from plait_qwen3.hf_adapter import Qwen3HFAdapter
from plait_qwen3.model import ModelArgs
from plait_qwen3.spec import qwen3_spec

ADAPTER = Qwen3HFAdapter()
SEQ_LEN = 48
VOCAB = 96


def _hf_config(*, moe: bool, tie: bool = False, norm_topk_prob: bool = True, n_kv_heads: int = 2):
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=n_kv_heads, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=tie,
    )  # fmt: skip  (8 heads of 16 = 128 query features on a 64-wide model, as in Qwen3)
    if not moe:
        return transformers.Qwen3Config(**common)
    return transformers.Qwen3MoeConfig(
        **common, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=3, norm_topk_prob=norm_topk_prob
    )


def _save_hf_model(folder: Path, *, moe: bool, seed: int = 0, **config_options):
    config = _hf_config(moe=moe, **config_options)
    cls = transformers.Qwen3MoeForCausalLM if moe else transformers.Qwen3ForCausalLM
    model = cls(config).eval()
    _randomize(model, seed)
    model.save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file(), "the test checkpoint must be sharded"
    return model


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))


def _hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def _plait_model(args, seed: int = 0):
    model = materialize(qwen3_spec(), args, seed=seed)
    _randomize(model, seed)
    return model.eval()


def _max_gap(model, hf_model) -> float:
    with torch.no_grad():
        return (model(_tokens()) - _hf_logits(hf_model, _tokens())).abs().max().item()


@pytest.mark.parametrize(
    ("moe", "options"),
    [
        (False, dict(tie=False, n_kv_heads=2)),
        (False, dict(tie=True, n_kv_heads=8)),
        (True, dict(norm_topk_prob=True)),
        (True, dict(norm_topk_prob=False, n_kv_heads=4)),
    ],
    ids=["dense-gqa", "dense-tied-mha", "moe-normalized", "moe-unnormalized"],
)
def test_from_pretrained_matches_transformers(tmp_path: Path, moe: bool, options: dict) -> None:
    hf_model = _save_hf_model(tmp_path, moe=moe, **options)

    model = plait.from_pretrained("qwen3", str(tmp_path))

    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.args.is_moe is moe
    assert model.args.head_dim == 16 and model.args.dim == 64
    if moe:
        assert model.args.moe.normalize_weights is options["norm_topk_prob"]
        assert not model.layers["0"].moe.expert_bias.any()
    assert _max_gap(model, hf_model) <= 1e-4


def test_parity_depends_on_the_head_norms(tmp_path: Path) -> None:
    """Control for the parity test: the same weights without the q/k norms differ."""
    hf_model = _save_hf_model(tmp_path, moe=False)
    model = plait.from_pretrained("qwen3", str(tmp_path))
    with torch.no_grad():
        for layer in model.layers.values():
            layer.attention.q_norm.weight.fill_(1.0)
    assert _max_gap(model, hf_model) > 1e-2


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_adapter_round_trip(tmp_path: Path, moe: bool) -> None:
    _save_hf_model(tmp_path, moe=moe)
    hf_config, hf_state = load_hf_folder(tmp_path)
    args = ADAPTER.args_from_hf_config(hf_config)

    ours = ADAPTER.from_hf(hf_state, args)
    back = ADAPTER.to_hf(ours, args)

    assert set(back) == set(hf_state)
    assert all(torch.equal(back[k], hf_state[k]) for k in back)
    assert ADAPTER.args_from_hf_config(ADAPTER.hf_config_from_args(args)) == args
    if moe:
        assert ours["layers.1.moe.experts.w1"].shape == (8, 24, 64)
        assert ours["layers.1.moe.experts.w2"].shape == (8, 64, 24)
        assert torch.equal(ours["layers.1.moe.experts.w3"][5], hf_state["model.layers.1.mlp.experts.5.up_proj.weight"])


DENSE_ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=24, vocab_size=VOCAB, ffn_hidden_dim=96,
                       max_seq_len=128)  # fmt: skip
MOE_ARGS = dataclasses.replace(DENSE_ARGS, moe=MoEArgs(num_experts=6, top_k=2, hidden_dim=32, normalize_weights=True))


def test_export_refuses_a_moved_expert_bias() -> None:
    model = _plait_model(MOE_ARGS)
    state_dict = model.state_dict()
    state_dict["layers.1.moe.expert_bias"][3] = 0.01
    with pytest.raises(CheckpointError, match="layer 1 has a non-zero expert bias.*--moe.load_balance_coeff 0"):
        ADAPTER.to_hf(state_dict, MOE_ARGS)


def test_adapter_errors(tmp_path: Path) -> None:
    _save_hf_model(tmp_path, moe=True)
    hf_config, hf_state = load_hf_folder(tmp_path)
    args = ADAPTER.args_from_hf_config(hf_config)

    without_expert = {k: v for k, v in hf_state.items() if k != "model.layers.1.mlp.experts.7.down_proj.weight"}
    with pytest.raises(CheckpointError, match="lacks 1 tensor.*layers.1.mlp.experts.7.down_proj"):
        ADAPTER.from_hf(without_expert, args)
    with pytest.raises(CheckpointError, match="does not use: model.layers.0.mlp.shared_expert.up_proj.weight"):
        ADAPTER.from_hf({**hf_state, "model.layers.0.mlp.shared_expert.up_proj.weight": torch.zeros(1)}, args)
    with pytest.raises(CheckpointError, match="unexpected: rope_cache"):
        ADAPTER.to_hf({**ADAPTER.from_hf(hf_state, args), "rope_cache": torch.zeros(1)}, args)

    bad_configs = [
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "RoPE type 'yarn'"),
        ({"model_type": "qwen2"}, "model_type 'qwen2'"),
        ({"attention_bias": True}, "attention biases are not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"use_sliding_window": True}, "sliding-window attention"),
        ({"mlp_only_layers": [1]}, "mix dense and expert MLPs"),
        ({"decoder_sparse_step": 2}, "mix dense and expert MLPs"),
    ]
    for change, message in bad_configs:
        with pytest.raises(ConfigError, match=message):
            ADAPTER.args_from_hf_config({**hf_config, **change})
    without_experts = {k: v for k, v in hf_config.items() if k not in ("num_experts", "num_local_experts")}
    with pytest.raises(ConfigError, match="qwen3_moe config.json lacks num_experts"):
        ADAPTER.args_from_hf_config(without_experts)
    sigmoid = dataclasses.replace(MOE_ARGS, moe=dataclasses.replace(MOE_ARGS.moe, score_func="sigmoid"))
    with pytest.raises(ConfigError, match="no HF equivalent"):
        ADAPTER.hf_config_from_args(sigmoid)


def test_config_reading_follows_the_official_layout() -> None:
    """config.json as the Qwen3-30B-A3B release writes it (transformers 4.51: rope_theta, num_experts)."""
    official = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
        "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_scaling": None, "num_experts": 128, "num_experts_per_tok": 8,
        "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": 40960,
        "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": None, "hidden_act": "silu",
    }  # fmt: skip
    from plait_qwen3.spec import FLAVORS

    assert ADAPTER.args_from_hf_config(official) == FLAVORS["30B-A3B"]


def test_from_pretrained_checks(tmp_path: Path) -> None:
    _save_hf_model(tmp_path, moe=False)
    model = plait.from_pretrained("qwen3", str(tmp_path), max_seq_len=64)
    assert model.rope_cache.shape == (64, 32)

    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConfigError, match="LlamaForCausalLM checkpoint.*Qwen3ForCausalLM, Qwen3MoeForCausalLM"):
        plait.from_pretrained("qwen3", str(tmp_path))

    (tmp_path / "config.json").write_text(json.dumps({**config, "head_dim": 8}))
    with pytest.raises(CheckpointError, match="shapes differ"):
        plait.from_pretrained("qwen3", str(tmp_path))
