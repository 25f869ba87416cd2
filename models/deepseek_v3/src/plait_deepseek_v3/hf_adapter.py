"""Conversion between plait's deepseek_v3 and Hugging Face's ``DeepseekV3ForCausalLM``.

Names map one to one, with four changes of layout:

* Experts: plait stacks them (``moe.experts.w1/w2/w3``, ``[expert, out, in]``). HF folders
  store them per expert (``mlp.experts.{e}.gate_proj/up_proj/down_proj.weight``: the
  official checkpoint and what transformers 5 saves) or fused
  (``mlp.experts.gate_up_proj`` ``[expert, 2 * hidden, dim]`` and ``mlp.experts.down_proj``).
  Import reads both; export writes per expert.
* RoPE: DeepSeek's checkpoints rotate interleaved pairs ``(x0, x1), (x2, x3), ...`` of the
  rope part of each query head and of the shared rotary key (HF ``rope_interleave``);
  plait rotates halves. Import reorders those rows of ``wq``/``wq_b`` and ``wkv_a``
  (even features first, then odd ones), export restores them. Attention scores are
  unchanged: queries and keys are permuted alike.
* fp8: block-wise fp8 weights with ``weight_scale_inv`` (the official checkpoint) are
  dequantized to float32 on import (``plait.hf_mapping.dequantize_fp8_blockwise``); export writes plain tensors.
* The multi-token-prediction layer of the official checkpoint (``model.layers.{n_layers}``)
  is not part of the model and is skipped on import.
"""
from __future__ import annotations

import math
from typing import Any

from plait.errors import ConfigError
from plait.hf_mapping import (
    FP8_BLOCK_SIZE,
    HF_BLOCK_NORMS,
    HF_DECODER_ENDS,
    HF_FEED_FORWARD,
    HFMapping,
    InterleavedRopeRows,
    MappedHFAdapter,
    StackedExperts,
    dequantize_fp8_blockwise,
    drop_hf_layers_from,
    hf_rope,
    layer_renames,
    renames,
    require_hf_keys,
)
from plait.nn import MoEArgs
from plait_deepseek_v3.args import ModelArgs

ARCHITECTURE = "DeepseekV3ForCausalLM"


def _dense_layers(args: ModelArgs) -> range:
    return range(args.n_dense_layers)


def _moe_layers(args: ModelArgs) -> range:
    return range(args.n_dense_layers, args.n_layers)


#: the rope rows of each query head and of the rotary key shared by all heads
_QUERY_ROPE = InterleavedRopeRows(head_dim=lambda a: a.qk_head_dim, rope_dim=lambda a: a.qk_rope_head_dim)
_KEY_ROPE = InterleavedRopeRows(head_dim=lambda a: a.kv_lora_rank + a.qk_rope_head_dim,
                                rope_dim=lambda a: a.qk_rope_head_dim)  # fmt: skip

MAPPING = HFMapping(
    model="deepseek_v3",
    entries=[
        *renames(HF_DECODER_ENDS),
        *layer_renames(
            {
                **HF_BLOCK_NORMS,
                "attention.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
                "attention.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
                "attention.wkv_b.weight": "self_attn.kv_b_proj.weight",
                "attention.wo.weight": "self_attn.o_proj.weight",
            },
            transforms={"attention.wkv_a.weight": _KEY_ROPE},
        ),
        *layer_renames({"attention.wq.weight": "self_attn.q_proj.weight"}, when=lambda a: not a.q_lora_rank,
                       transforms={"attention.wq.weight": _QUERY_ROPE}),
        *layer_renames(
            {
                "attention.wq_a.weight": "self_attn.q_a_proj.weight",
                "attention.q_norm.weight": "self_attn.q_a_layernorm.weight",
                "attention.wq_b.weight": "self_attn.q_b_proj.weight",
            },
            when=lambda a: bool(a.q_lora_rank),
            transforms={"attention.wq_b.weight": _QUERY_ROPE},
        ),
        *layer_renames(HF_FEED_FORWARD, layers=_dense_layers),
        *layer_renames(
            {
                "moe.router.gate.weight": "mlp.gate.weight",
                "moe.expert_bias": "mlp.gate.e_score_correction_bias",
                "moe.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
                "moe.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
                "moe.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
            },
            layers=_moe_layers,
        ),
        StackedExperts(layers=_moe_layers),
    ],
    # the multi-token-prediction layer of the official checkpoint follows the last block
    prepare=(drop_hf_layers_from(lambda a: a.n_layers), dequantize_fp8_blockwise),
)  # fmt: skip
_REQUIRED_HF_KEYS = (
    "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
    "vocab_size", "n_routed_experts", "num_experts_per_tok", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    "v_head_dim",
)  # fmt: skip


# --------------------------------------------------------------------------- config


def _yarn_fields(hf_config: dict[str, Any]) -> dict[str, Any]:
    """ModelArgs RoPE fields from ``rope_parameters`` (transformers 5) or ``rope_theta`` +
    ``rope_scaling`` (transformers 4 and the official config.json)."""
    rope = hf_rope(hf_config)
    params, theta, rope_type = rope.params, rope.theta, rope.rope_type
    max_positions = int(hf_config.get("max_position_embeddings", 4096))
    if rope_type == "default":
        return {"rope_theta": theta, "rope_factor": 1.0, "max_seq_len": max_positions}
    if rope_type != "yarn":
        raise ConfigError(
            f"deepseek_v3: RoPE type {rope_type!r} in config.json is not supported; expected 'default' or 'yarn'"
        )
    if not params.get("factor") or float(params["factor"]) <= 1:
        raise ConfigError(f"deepseek_v3: the YaRN factor in config.json must be above 1, got {params.get('factor')}")
    factor = float(params["factor"])
    original = int(params.get("original_max_position_embeddings") or max_positions)
    if max_positions <= original:
        raise ConfigError(
            f"deepseek_v3: YaRN with max_position_embeddings ({max_positions}) not above "
            f"original_max_position_embeddings ({original}) is not supported: plait applies YaRN only past the "
            "original context"
        )
    if params.get("truncate", True) is False:
        raise ConfigError("deepseek_v3: YaRN with truncate=false in config.json is not supported")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")

    def yarn_mscale(scale: float) -> float:
        return 0.1 * scale * math.log(factor) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        both = mscale and mscale_all_dim
        attention_factor = yarn_mscale(mscale) / yarn_mscale(mscale_all_dim) if both else yarn_mscale(1.0)
    if abs(attention_factor - 1.0) > 1e-9:
        raise ConfigError(
            f"deepseek_v3: the YaRN parameters in config.json scale cos/sin by {attention_factor:.6g} "
            "(transformers does unless mscale equals mscale_all_dim or attention_factor is 1); only YaRN "
            "without that scaling is supported"
        )
    return {
        "rope_theta": theta,
        "rope_factor": factor,
        "original_seq_len": original,
        "beta_fast": float(params.get("beta_fast") or 32.0),
        "beta_slow": float(params.get("beta_slow") or 1.0),
        "mscale": float(mscale_all_dim or 0.0),  # the softmax correction: HF reads mscale_all_dim for it
        "max_seq_len": max_positions,
    }


def _check_supported(hf_config: dict[str, Any]) -> None:
    model_type = hf_config.get("model_type", "deepseek_v3")
    if model_type != "deepseek_v3":
        raise ConfigError(f"deepseek_v3: config.json has model_type {model_type!r}; expected 'deepseek_v3'")
    require_hf_keys("deepseek_v3", hf_config, _REQUIRED_HF_KEYS)
    refused = {
        "attention_bias": (bool(hf_config.get("attention_bias")), "attention biases"),
        "tie_word_embeddings": (bool(hf_config.get("tie_word_embeddings", False)), "tied embeddings"),
        "rope_interleave": (hf_config.get("rope_interleave") is False, "rotate-half RoPE weights"),
        "hidden_act": (hf_config.get("hidden_act", "silu") != "silu", "activations other than silu"),
        "scoring_func": (hf_config.get("scoring_func", "sigmoid") != "sigmoid", "router scores other than sigmoid"),
        "topk_method": (hf_config.get("topk_method", "noaux_tc") != "noaux_tc", "top-k methods other than noaux_tc"),
        "moe_layer_freq": (hf_config.get("moe_layer_freq", 1) != 1, "dense layers between MoE layers"),
    }
    for key, (bad, what) in refused.items():
        if bad:
            raise ConfigError(f"deepseek_v3: {what} are not supported ({key} is {hf_config[key]!r} in config.json)")
    kv_heads = hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"]
    if kv_heads != hf_config["num_attention_heads"]:
        raise ConfigError(
            f"deepseek_v3: num_key_value_heads ({kv_heads}) must equal num_attention_heads "
            f"({hf_config['num_attention_heads']}): latent attention expands keys and values for every head"
        )
    quantization = hf_config.get("quantization_config")
    if quantization:
        block = list(quantization.get("weight_block_size") or [])
        if quantization.get("quant_method") != "fp8" or block != list(FP8_BLOCK_SIZE):
            raise ConfigError(
                "deepseek_v3: only block-wise fp8 checkpoints (quant_method 'fp8', weight_block_size "
                f"{list(FP8_BLOCK_SIZE)}) can be imported; config.json has {quantization}"
            )


def _moe_args(hf_config: dict[str, Any]) -> MoEArgs:
    return MoEArgs(
        num_experts=int(hf_config["n_routed_experts"]),
        top_k=int(hf_config["num_experts_per_tok"]),
        hidden_dim=int(hf_config["moe_intermediate_size"]),
        num_shared_experts=int(hf_config.get("n_shared_experts") or 0),
        score_func="sigmoid",
        num_groups=int(hf_config.get("n_group") or 1),
        topk_groups=int(hf_config.get("topk_group") or 1),
        normalize_weights=bool(hf_config.get("norm_topk_prob", True)),
        route_scale=float(hf_config.get("routed_scaling_factor", 1.0)),
        gate_in_float32=True,  # the HF router computes its logits in float32
    )


class DeepSeekV3HFAdapter(MappedHFAdapter):
    hf_architectures: tuple[str, ...] = (ARCHITECTURE,)
    mapping = MAPPING

    def args_from_hf_config(self, hf_config: dict[str, Any]) -> ModelArgs:
        _check_supported(hf_config)
        return ModelArgs(
            dim=hf_config["hidden_size"],
            n_layers=hf_config["num_hidden_layers"],
            n_dense_layers=min(int(hf_config.get("first_k_dense_replace") or 0), hf_config["num_hidden_layers"]),
            n_heads=hf_config["num_attention_heads"],
            vocab_size=hf_config["vocab_size"],
            inter_dim=hf_config["intermediate_size"],
            moe=_moe_args(hf_config),
            q_lora_rank=int(hf_config.get("q_lora_rank") or 0),
            kv_lora_rank=hf_config["kv_lora_rank"],
            qk_nope_head_dim=hf_config["qk_nope_head_dim"],
            qk_rope_head_dim=hf_config["qk_rope_head_dim"],
            v_head_dim=hf_config["v_head_dim"],
            norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
            **_yarn_fields(hf_config),
        )

    def hf_config_from_args(self, args: ModelArgs) -> dict[str, Any]:
        moe = args.moe
        if moe.score_func != "sigmoid":
            raise ConfigError(
                f"deepseek_v3: HF DeepseekV3 routes by sigmoid scores; these MoE args use {moe.score_func!r} "
                "(the 16B flavor), which has no HF DeepseekV3 equivalent"
            )
        rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": args.rope_theta}
        yarn = args.yarn
        if yarn is not None:
            rope_parameters = {
                "rope_type": "yarn", "rope_theta": args.rope_theta, "factor": yarn.factor,
                "original_max_position_embeddings": yarn.original_seq_len, "beta_fast": yarn.beta_fast,
                "beta_slow": yarn.beta_slow, "mscale": yarn.mscale, "mscale_all_dim": yarn.mscale,
                "attention_factor": 1.0,
            }  # fmt: skip
        return {
            "architectures": [ARCHITECTURE],
            "model_type": "deepseek_v3",
            "vocab_size": args.vocab_size,
            "hidden_size": args.dim,
            "intermediate_size": args.inter_dim,
            "moe_intermediate_size": moe.hidden_dim,
            "num_hidden_layers": args.n_layers,
            "first_k_dense_replace": args.n_dense_layers,
            "num_attention_heads": args.n_heads,
            "num_key_value_heads": args.n_heads,
            "n_routed_experts": moe.num_experts,
            "n_shared_experts": moe.num_shared_experts,
            "num_experts_per_tok": moe.top_k,
            "n_group": moe.num_groups,
            "topk_group": moe.topk_groups if moe.num_groups > 1 else 1,
            "norm_topk_prob": moe.normalize_weights,
            "routed_scaling_factor": moe.route_scale,
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
            "q_lora_rank": args.q_lora_rank or None,
            "kv_lora_rank": args.kv_lora_rank,
            "qk_nope_head_dim": args.qk_nope_head_dim,
            "qk_rope_head_dim": args.qk_rope_head_dim,
            "v_head_dim": args.v_head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": args.norm_eps,
            "max_position_embeddings": args.max_seq_len,
            "tie_word_embeddings": False,
            "attention_bias": False,
            "rope_interleave": True,
            "num_nextn_predict_layers": 0,
            "rope_parameters": rope_parameters,
            # Read by transformers 4.x, which predates ``rope_parameters``.
            "rope_theta": args.rope_theta,
            "rope_scaling": {k: v for k, v in rope_parameters.items() if k != "rope_theta"} if yarn else None,
        }
