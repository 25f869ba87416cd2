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
from plait.hf import export_checkpoint_to_hf, load_hf_folder, save_hf_folder
from plait.nn import MoEArgs
from plait_qwen3.hf_adapter import Qwen3HFAdapter
from plait_qwen3.model import ModelArgs, Transformer
from plait_qwen3.spec import qwen3_spec

ADAPTER = Qwen3HFAdapter()
SEQ_LEN = 48
VOCAB = 96


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that a wrong layout, norm or routing shows in the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.15 * noise)


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


def _fuse_experts(folder: Path, out: Path, num_experts: int, n_layers: int) -> None:
    """Rewrite a per-expert checkpoint with fused 3-D expert tensors (gate and up stacked)."""
    config, tensors = load_hf_folder(folder)
    for layer in range(n_layers):
        prefix = f"model.layers.{layer}.mlp.experts"
        pop = lambda e, p: tensors.pop(f"{prefix}.{e}.{p}.weight")  # noqa: E731
        gate = torch.stack([pop(e, "gate_proj") for e in range(num_experts)])
        up = torch.stack([pop(e, "up_proj") for e in range(num_experts)])
        tensors[f"{prefix}.down_proj"] = torch.stack([pop(e, "down_proj") for e in range(num_experts)])
        tensors[f"{prefix}.gate_up_proj"] = torch.cat([gate, up], dim=1)
    save_hf_folder(out, config, tensors)


def test_fused_expert_layout_loads_the_same_model(tmp_path: Path) -> None:
    hf_model = _save_hf_model(tmp_path / "per_expert", moe=True)
    _fuse_experts(tmp_path / "per_expert", tmp_path / "fused", num_experts=8, n_layers=2)

    model = plait.from_pretrained("qwen3", str(tmp_path / "fused"))

    reference = plait.from_pretrained("qwen3", str(tmp_path / "per_expert"))
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert _max_gap(model, hf_model) <= 1e-4


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


def _plait_model(args: ModelArgs, seed: int = 0) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_weights()
    _randomize(model, seed)
    return model.eval()


DENSE_ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=24, vocab_size=VOCAB, ffn_hidden_dim=96,
                       max_seq_len=128)  # fmt: skip
MOE_ARGS = dataclasses.replace(DENSE_ARGS, moe=MoEArgs(num_experts=6, top_k=2, hidden_dim=32, normalize_weights=True))


@pytest.mark.parametrize(
    ("args", "architecture"),
    [
        (DENSE_ARGS, "Qwen3ForCausalLM"),
        (dataclasses.replace(DENSE_ARGS, tie_word_embeddings=True), "Qwen3ForCausalLM"),
        (MOE_ARGS, "Qwen3MoeForCausalLM"),
    ],
    ids=["dense", "dense-tied", "moe"],
)
def test_export_loads_in_transformers(tmp_path: Path, args: ModelArgs, architecture: str) -> None:
    model = _plait_model(args)
    save_hf_folder(tmp_path / "hf", ADAPTER.hf_config_from_args(args), ADAPTER.to_hf(model.state_dict(), args),
                   max_shard_bytes=60_000)  # fmt: skip

    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf_model).__name__ == architecture
    assert _max_gap(model, hf_model) <= 1e-4


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_export_checkpoint_to_hf_and_back(tmp_path: Path) -> None:
    """A DCP folder whose model weights sit under "model", next to other state."""
    import torch.distributed.checkpoint as dcp

    model = _plait_model(MOE_ARGS, seed=5)
    dcp.save({"model": model.state_dict(), "train_state": {"step": torch.tensor(7)}},
             checkpoint_id=str(tmp_path / "step-7"))  # fmt: skip

    export_checkpoint_to_hf(tmp_path / "step-7", qwen3_spec(), MOE_ARGS, tmp_path / "hf", max_shard_bytes=80_000)

    hf_model = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert _max_gap(model, hf_model) <= 1e-4
    reloaded = plait.from_pretrained("qwen3", str(tmp_path / "hf"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


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
