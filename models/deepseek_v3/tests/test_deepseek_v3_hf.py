"""Hugging Face interop: logits match transformers' DeepseekV3ForCausalLM when loading (also
from block-wise fp8 weights and fused expert tensors) and after exporting."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import plait
from plait.errors import CheckpointError, ConfigError
from plait.hf import load_hf_folder, save_hf_folder
from plait.hf_mapping import dequantize_blockwise
from plait_deepseek_v3.hf_adapter import DeepSeekV3HFAdapter
from plait_deepseek_v3.spec import FLAVORS

ADAPTER = DeepSeekV3HFAdapter()
SEQ_LEN = 48
VOCAB = 96
N_EXPERTS = 8
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.9, "mscale_all_dim": 0.9}  # fmt: skip


def _hf_config(*, q_lora_rank: int | None = 32, rope: dict | None = None, hidden_size: int = 64, **changes):
    options = dict(
        vocab_size=VOCAB, hidden_size=hidden_size, intermediate_size=112, moe_intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=N_EXPERTS,
        routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=q_lora_rank, qk_rope_head_dim=8, v_head_dim=12,
        qk_nope_head_dim=16, n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1,
        max_position_embeddings=128, rope_parameters=dict(rope or YARN),
    )  # fmt: skip  (values narrower than queries and keys, as in DeepSeek-V3)
    options.update(changes)
    return transformers.DeepseekV3Config(**options)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that a wrong layout, norm or routing shows in the logits, and
    correction biases that change which experts are chosen."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.15 * noise)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))


def _save_hf_model(folder: Path, *, seed: int = 0, **config_options):
    model = transformers.DeepseekV3ForCausalLM(_hf_config(**config_options)).eval()
    _randomize(model, seed)
    model.save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file(), "the test checkpoint must be sharded"
    return model


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))


def _max_gap(model, hf_model) -> float:
    with torch.no_grad():
        return (model(_tokens()) - hf_model(_tokens()).logits).abs().max().item()


@pytest.mark.parametrize(
    "options",
    [dict(q_lora_rank=32), dict(q_lora_rank=None), dict(rope={"rope_type": "default", "rope_theta": 10000.0})],
    ids=["q-lora-yarn", "plain-q-yarn", "q-lora-default-rope"],
)
def test_from_pretrained_matches_transformers(tmp_path: Path, options: dict) -> None:
    hf_model = _save_hf_model(tmp_path, **options)

    model = plait.from_pretrained("deepseek_v3", str(tmp_path))

    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    args = model.args
    assert (args.n_dense_layers, args.moe.num_groups, args.moe.topk_groups, args.moe.route_scale) == (1, 4, 2, 2.5)
    assert args.moe.group_limited and args.moe.score_func == "sigmoid"
    assert args.q_lora_rank == (options.get("q_lora_rank", 32) or 0)
    assert args.softmax_scale == pytest.approx(hf_model.model.layers[0].self_attn.scaling, rel=1e-12)
    assert (args.yarn is not None) is ("rope" not in options)
    bias = model.layers["2"].moe.expert_bias
    assert torch.equal(bias, hf_model.model.layers[2].mlp.gate.e_score_correction_bias) and bias.any()
    assert _max_gap(model, hf_model) <= 1e-4


def test_parity_depends_on_the_rope_layout_and_the_correction_bias(tmp_path: Path) -> None:
    """Controls for the parity test: the interleaved rope rows and the bias both matter."""
    hf_model = _save_hf_model(tmp_path)
    hf_config, hf_state = load_hf_folder(tmp_path)
    args = ADAPTER.args_from_hf_config(hf_config)
    model = plait.from_pretrained("deepseek_v3", str(tmp_path))
    loaded = model.state_dict()

    with torch.no_grad():
        model.layers["1"].attention.wkv_a.weight.copy_(hf_state["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"])
    assert _max_gap(model, hf_model) > 1e-2

    model.load_state_dict(loaded)
    with torch.no_grad():
        for layer in range(args.n_dense_layers, args.n_layers):
            model.layers[str(layer)].moe.expert_bias.zero_()
    assert _max_gap(model, hf_model) > 1e-2


# --------------------------------------------------------------------------- fp8

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def _quantize_blockwise(weight: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The official checkpoint's format: fp8 e4m3 values and one float32 scale per 128x128 block."""
    rows, cols = weight.shape
    scales = torch.empty(math.ceil(rows / block), math.ceil(cols / block))
    quantized = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            tile = weight[i * block : (i + 1) * block, j * block : (j + 1) * block].float()
            scale = tile.abs().max().clamp(min=1e-12) / FP8_MAX
            scales[i, j] = scale
            quantized[i * block : (i + 1) * block, j * block : (j + 1) * block] = (tile / scale).to(torch.float8_e4m3fn)
    return quantized, scales


def _reference_dequantize(quantized: torch.Tensor, scales: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Element by block: w[r, c] = fp8[r, c] * scale_inv[r // 128, c // 128]."""
    rows = torch.arange(quantized.shape[0]) // block
    cols = torch.arange(quantized.shape[1]) // block
    return quantized.float() * scales[rows[:, None], cols[None, :]]


def test_blockwise_dequantization_covers_partial_blocks() -> None:
    weight = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    weight[:128, 128:] *= 100  # blocks with different ranges get different scales
    quantized, scales = _quantize_blockwise(weight)
    assert scales.shape == (3, 2) and scales[0, 1] > 50 * scales[0, 0]

    restored = dequantize_blockwise(quantized, scales, name="w")

    assert torch.equal(restored, _reference_dequantize(quantized, scales))
    assert torch.allclose(restored, weight, rtol=0.07, atol=1e-2)  # e4m3 keeps 3 mantissa bits
    with pytest.raises(CheckpointError, match=r"w: weight_scale_inv has shape \(2, 2\).*needs \(3, 2\)"):
        dequantize_blockwise(quantized, scales[:2], name="w")


def _is_quantized_in_official_checkpoint(name: str) -> bool:
    """Linear weights of attention and MLPs; not embeddings, norms, router or LM head."""
    return name.endswith("_proj.weight") and name.startswith("model.layers.")


def test_fp8_checkpoint_loads_dequantized(tmp_path: Path) -> None:
    """A tiny model (hidden 160: full and partial 128-blocks) quantized in the official layout."""
    hf_model = _save_hf_model(tmp_path / "fp32", hidden_size=160)
    config, tensors = load_hf_folder(tmp_path / "fp32")
    fp8_tensors, dequantized = {}, {}
    for name, tensor in tensors.items():
        if _is_quantized_in_official_checkpoint(name):
            quantized, scales = _quantize_blockwise(tensor)
            fp8_tensors[name], fp8_tensors[name + "_scale_inv"] = quantized, scales
            dequantized[name] = _reference_dequantize(quantized, scales)
        else:
            fp8_tensors[name] = dequantized[name] = tensor
    save_hf_folder(tmp_path / "dequantized", config, dequantized)
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [128, 128]}  # fmt: skip
    save_hf_folder(tmp_path / "fp8", config, fp8_tensors)
    assert fp8_tensors["model.layers.0.self_attn.q_a_proj.weight"].dtype == torch.float8_e4m3fn
    assert fp8_tensors["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"].shape == (1, 2)

    model = plait.from_pretrained("deepseek_v3", str(tmp_path / "fp8"))

    gap_to_fp32 = _max_gap(model, hf_model)
    reference = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "dequantized").eval()
    assert _max_gap(model, reference) <= 1e-4
    assert gap_to_fp32 > 1e-3  # the quantization did change the weights


def test_fp8_errors() -> None:
    hf_config = _hf_config().to_dict()
    args = ADAPTER.args_from_hf_config(hf_config)
    tensors = {"model.layers.0.self_attn.o_proj.weight": torch.zeros(4, 4, dtype=torch.float8_e4m3fn)}
    with pytest.raises(CheckpointError, match="fp8 tensors without a weight_scale_inv: model.layers.0.self_attn"):
        ADAPTER.from_hf(tensors, args)
    with pytest.raises(CheckpointError, match="scales without their fp8 weight: model.layers.0.mlp.up_proj"):
        ADAPTER.from_hf({"model.layers.0.mlp.up_proj.weight_scale_inv": torch.ones(1, 1)}, args)
    bad = {**hf_config, "quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}}
    with pytest.raises(ConfigError, match="only block-wise fp8 checkpoints.*128, 128"):
        ADAPTER.args_from_hf_config(bad)


# --------------------------------------------------------------------------- round trips


def test_adapter_round_trip_is_exact(tmp_path: Path) -> None:
    _save_hf_model(tmp_path)
    hf_config, hf_state = load_hf_folder(tmp_path)
    args = ADAPTER.args_from_hf_config(hf_config)

    ours = ADAPTER.from_hf(hf_state, args)
    back = ADAPTER.to_hf(ours, args)

    assert set(back) == set(hf_state)
    assert all(torch.equal(back[k], hf_state[k]) for k in back)
    assert ADAPTER.args_from_hf_config(ADAPTER.hf_config_from_args(args)) == args
    assert ours["layers.1.moe.experts.w1"].shape == (N_EXPERTS, 24, 64)
    assert torch.equal(ours["layers.2.moe.experts.w2"][5], hf_state["model.layers.2.mlp.experts.5.down_proj.weight"])
    # rope rows of the shared rotary key: even features first, then odd ones
    hf_rope = hf_state["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"][16:]
    assert torch.equal(ours["layers.0.attention.wkv_a.weight"][16:], torch.cat([hf_rope[0::2], hf_rope[1::2]]))


# --------------------------------------------------------------------------- the official layout


def test_official_config_and_multi_token_prediction_layer(tmp_path: Path) -> None:
    """config.json as the DeepSeek-V3 release writes it reads as the 671B flavor (at its
    163840-token context), and the checkpoint's MTP layer is skipped."""
    official = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
        "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
        "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
        "n_routed_experts": 256, "ep_size": 1, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8,
        "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
        "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "rope_theta": 10000, "attention_bias": False,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
    }  # fmt: skip
    args = ADAPTER.args_from_hf_config(official)
    assert args == dataclasses.replace(FLAVORS["671B"], max_seq_len=163840)
    assert args.softmax_scale == pytest.approx(192**-0.5 * (0.1 * math.log(40) + 1) ** 2)

    _save_hf_model(tmp_path)
    hf_config, hf_state = load_hf_folder(tmp_path)
    tiny = ADAPTER.args_from_hf_config(hf_config)
    mtp = {"model.layers.3.eh_proj.weight": torch.zeros(2, 2, dtype=torch.float8_e4m3fn),
           "model.layers.3.eh_proj.weight_scale_inv": torch.ones(1, 1), "model.layers.3.enorm.weight": torch.ones(2)}
    assert ADAPTER.from_hf({**hf_state, **mtp}, tiny).keys() == ADAPTER.from_hf(hf_state, tiny).keys()
    with pytest.raises(CheckpointError, match="does not use: model.layers.4.enorm.weight"):
        ADAPTER.from_hf({**hf_state, "model.layers.4.enorm.weight": torch.ones(2)}, tiny)


def test_adapter_errors(tmp_path: Path) -> None:
    _save_hf_model(tmp_path)
    hf_config, hf_state = load_hf_folder(tmp_path)
    args = ADAPTER.args_from_hf_config(hf_config)

    without_expert = {k: v for k, v in hf_state.items() if k != "model.layers.2.mlp.experts.7.down_proj.weight"}
    with pytest.raises(CheckpointError, match="lacks 1 tensor.*layers.2.mlp.experts.7.down_proj"):
        ADAPTER.from_hf(without_expert, args)
    with pytest.raises(CheckpointError, match="lacks 1 tensor.*layers.0.self_attn.q_a_layernorm"):
        ADAPTER.from_hf({k: v for k, v in hf_state.items() if "layers.0.self_attn.q_a_layernorm" not in k}, args)
    with pytest.raises(CheckpointError, match="unexpected: rope_cache"):
        ADAPTER.to_hf({**ADAPTER.from_hf(hf_state, args), "rope_cache": torch.zeros(1)}, args)

    yarn = hf_config["rope_parameters"]
    bad_configs = [
        ({"model_type": "deepseek_v2"}, "model_type 'deepseek_v2'"),
        ({"rope_interleave": False}, "rotate-half RoPE weights"),
        ({"scoring_func": "softmax"}, "router scores other than sigmoid"),
        ({"attention_bias": True}, "attention biases"),
        ({"num_key_value_heads": 2}, "must equal num_attention_heads"),
        ({"rope_parameters": {**yarn, "rope_type": "longrope"}}, "RoPE type 'longrope'"),
        ({"rope_parameters": {**yarn, "mscale": 1.0}}, "scale cos/sin by 1.01233"),
        ({"rope_parameters": {**yarn, "mscale": None, "mscale_all_dim": None}}, "scale cos/sin by 1.13863"),
        ({"max_position_embeddings": 32}, "not above original_max_position_embeddings"),
    ]
    for change, message in bad_configs:
        with pytest.raises(ConfigError, match=message):
            ADAPTER.args_from_hf_config({**hf_config, **change})
    without = {k: v for k, v in hf_config.items() if k != "kv_lora_rank"}
    with pytest.raises(ConfigError, match="config.json lacks kv_lora_rank"):
        ADAPTER.args_from_hf_config(without)
    with pytest.raises(ConfigError, match="sigmoid scores.*'softmax'.*16B"):
        ADAPTER.hf_config_from_args(FLAVORS["16B"])


def test_from_pretrained_checks(tmp_path: Path) -> None:
    _save_hf_model(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConfigError, match="LlamaForCausalLM checkpoint.*DeepseekV3ForCausalLM"):
        plait.from_pretrained("deepseek_v3", str(tmp_path))

    (tmp_path / "config.json").write_text(json.dumps({**config, "v_head_dim": 8}))
    with pytest.raises(CheckpointError, match="shapes differ"):
        plait.from_pretrained("deepseek_v3", str(tmp_path))
