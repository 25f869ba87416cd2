"""Hugging Face interop: logits match transformers' Llama when loading and after exporting."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import plait
from plait.errors import CheckpointError, ConfigError
from plait.testing import randomize_parameters as _randomize
from plait.hf import load_hf_folder, save_hf_folder
from plait_llama3.hf_adapter import Llama3HFAdapter

ADAPTER = Llama3HFAdapter()
LLAMA31_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,  # below the test length, so the scaling matters
}
SEQ_LEN = 96


def _save_hf_model(folder: Path, *, tie: bool, n_kv_heads: int, rope: dict | None, seed: int = 0):
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_parameters=rope,
        tie_word_embeddings=tie,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    _randomize(model, seed)
    model.save_pretrained(folder, max_shard_size="60KB")
    assert (folder / "model.safetensors.index.json").is_file(), "the test checkpoint must be sharded"
    return model


def _tokens(vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))


def _hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def _to_legacy_config(folder: Path) -> None:
    """Rewrite config.json the way transformers 4.x wrote it: rope_theta + rope_scaling."""
    config = json.loads((folder / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope if rope.get("rope_type") != "default" else None
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("tie", "n_kv_heads", "rope", "legacy"),
    [
        (False, 2, LLAMA31_ROPE, False),  # Llama 3.1 style: GQA, scaled RoPE
        (True, 8, None, False),  # tied embeddings (Llama 3.2 style), plain RoPE, MHA
        (False, 4, LLAMA31_ROPE, True),  # config.json in the pre-transformers-5 layout
    ],
    ids=["gqa-llama3-rope", "tied-mha", "legacy-config"],
)
def test_from_pretrained_matches_transformers(tmp_path: Path, tie: bool, n_kv_heads: int, rope, legacy: bool) -> None:
    hf_model = _save_hf_model(tmp_path, tie=tie, n_kv_heads=n_kv_heads, rope=rope)
    if legacy:
        _to_legacy_config(tmp_path)
    tokens = _tokens()

    model = plait.from_pretrained("llama3", str(tmp_path))

    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.args.tie_word_embeddings is tie
    assert model.args.use_rope_scaling is (rope is not None)
    with torch.no_grad():
        logits = model(tokens)
    torch.testing.assert_close(logits, _hf_logits(hf_model, tokens), rtol=0, atol=1e-4)


def test_parity_depends_on_rope_scaling(tmp_path: Path) -> None:
    """Control for the parity test: the same weights without the frequency scaling differ."""
    hf_model = _save_hf_model(tmp_path, tie=False, n_kv_heads=2, rope=LLAMA31_ROPE)
    model = plait.from_pretrained("llama3", str(tmp_path), use_rope_scaling=False)
    with torch.no_grad():
        gap = (model(_tokens()) - _hf_logits(hf_model, _tokens())).abs().max().item()
    assert gap > 1e-2


def test_adapter_round_trip(tmp_path: Path) -> None:
    for tie in (False, True):
        folder = tmp_path / f"tie{tie}"
        _save_hf_model(folder, tie=tie, n_kv_heads=2, rope=LLAMA31_ROPE)
        hf_config, hf_state = load_hf_folder(folder)
        args = ADAPTER.args_from_hf_config(hf_config)
        ours = ADAPTER.from_hf(hf_state, args)
        assert ("output.weight" in ours) and (ours["output.weight"] is ours["tok_embeddings.weight"]) is tie
        back = ADAPTER.to_hf(ours, args)
        assert set(back) == set(hf_state)
        assert all(back[k] is hf_state[k] for k in back)
        assert ADAPTER.args_from_hf_config(ADAPTER.hf_config_from_args(args)) == args


def test_save_hf_folder_layouts(tmp_path: Path) -> None:
    tensors = {"a": torch.ones(10), "b": torch.zeros(10, dtype=torch.bfloat16)}
    save_hf_folder(tmp_path / "single", {"model_type": "x"}, tensors)
    assert sorted(p.name for p in (tmp_path / "single").iterdir()) == ["config.json", "model.safetensors"]
    config, loaded = load_hf_folder(tmp_path / "single")
    assert config == {"model_type": "x", "dtype": "float32"}
    assert loaded["b"].dtype == torch.bfloat16 and torch.equal(loaded["a"], tensors["a"])

    save_hf_folder(tmp_path / "sharded", {}, tensors, max_shard_bytes=40)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    assert index["metadata"]["total_size"] == 60
    assert set(load_hf_folder(tmp_path / "sharded")[1]) == {"a", "b"}

    with pytest.raises(ConfigError, match="not an empty folder"):
        save_hf_folder(tmp_path / "single", {}, tensors)


def test_load_hf_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist.*config.json"):
        load_hf_folder(tmp_path / "nowhere")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        load_hf_folder(tmp_path / "empty")

    folder = tmp_path / "model"
    _save_hf_model(folder, tie=False, n_kv_heads=2, rope=None)
    shards = sorted(folder.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(ConfigError, match=f"lacks the shard.*{shards[-1].name}"):
        load_hf_folder(folder)
    (folder / "model.safetensors.index.json").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="no model.safetensors.*re-save them as safetensors"):
        load_hf_folder(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_hf_folder(folder)


def test_adapter_errors(tmp_path: Path) -> None:
    _save_hf_model(tmp_path, tie=False, n_kv_heads=2, rope=None)
    hf_config, hf_state = load_hf_folder(tmp_path)
    args = ADAPTER.args_from_hf_config(hf_config)

    with pytest.raises(CheckpointError, match="lacks 1 tensor.*lm_head.weight"):
        ADAPTER.from_hf({k: v for k, v in hf_state.items() if k != "lm_head.weight"}, args)
    with pytest.raises(CheckpointError, match="does not use: model.layers.9.mlp.gate_proj.weight"):
        ADAPTER.from_hf({**hf_state, "model.layers.9.mlp.gate_proj.weight": torch.zeros(1)}, args)
    assert "layers.0.attention.wq.weight" in ADAPTER.from_hf(
        {**hf_state, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(4)}, args
    )
    with pytest.raises(CheckpointError, match="unexpected: rope_cache"):
        ADAPTER.to_hf({**ADAPTER.from_hf(hf_state, args), "rope_cache": torch.zeros(1)}, args)

    bad_configs = [
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "RoPE type 'yarn'"),
        ({"head_dim": 16}, "head_dim 16 differs"),
        ({"model_type": "mistral"}, "model_type 'mistral'"),
        ({"attention_bias": True}, "biases are not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ]
    for change, message in bad_configs:
        with pytest.raises(ConfigError, match=message):
            ADAPTER.args_from_hf_config({**hf_config, **change})
    with pytest.raises(ConfigError, match="lacks vocab_size"):
        ADAPTER.args_from_hf_config({k: v for k, v in hf_config.items() if k != "vocab_size"})


def test_from_pretrained_checks(tmp_path: Path) -> None:
    _save_hf_model(tmp_path, tie=False, n_kv_heads=2, rope=LLAMA31_ROPE)
    model = plait.from_pretrained("llama3", str(tmp_path), max_seq_len=64)
    assert model.rope_cache.shape[0] == 64
    with pytest.raises(ConfigError, match="unknown model argument.*n_experts"):
        plait.from_pretrained("llama3", str(tmp_path), n_experts=4)

    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel checkpoint.*LlamaForCausalLM"):
        plait.from_pretrained("llama3", str(tmp_path))

    (tmp_path / "config.json").write_text(json.dumps({**config, "vocab_size": 97}))
    with pytest.raises(CheckpointError, match="shapes differ"):
        plait.from_pretrained("llama3", str(tmp_path))
