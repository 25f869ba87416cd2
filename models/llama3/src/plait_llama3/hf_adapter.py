"""Conversion between plait's llama3 and Hugging Face's ``LlamaForCausalLM``.

Both use the rotate-half RoPE layout, so tensors map one to one by name: no
permutation, no reshaping. Tied embeddings (Llama 3.2 1B/3B) keep only
``model.embed_tokens.weight`` on the HF side and both names on the plait side.
"""
from __future__ import annotations

from typing import Any

from plait.errors import ConfigError
from plait.hf_mapping import (
    HF_BLOCK_NORMS,
    HF_DECODER_ENDS,
    HF_FEED_FORWARD,
    HFMapping,
    MappedHFAdapter,
    hf_rope,
    layer_renames,
    renames,
    require_hf_keys,
)
from plait_llama3.model import ModelArgs

MAPPING = HFMapping(
    model="llama3",
    entries=[
        *renames(HF_DECODER_ENDS),
        *layer_renames({
            **HF_BLOCK_NORMS,
            "attention.wq.weight": "self_attn.q_proj.weight",
            "attention.wk.weight": "self_attn.k_proj.weight",
            "attention.wv.weight": "self_attn.v_proj.weight",
            "attention.wo.weight": "self_attn.o_proj.weight",
            **HF_FEED_FORWARD,
        }),
    ],
)  # fmt: skip
_REQUIRED_HF_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def _rope_fields(hf_config: dict[str, Any]) -> dict[str, Any]:
    rope = hf_rope(hf_config)
    if rope.rope_type == "default":
        return {"rope_theta": rope.theta, "use_rope_scaling": False}
    if rope.rope_type != "llama3":
        raise ConfigError(
            f"llama3: RoPE type {rope.rope_type!r} in config.json is not supported; "
            "supported: 'default' and 'llama3' (Llama 3.1 frequency scaling)"
        )
    params = rope.params
    try:
        return {
            "rope_theta": rope.theta,
            "use_rope_scaling": True,
            "rope_scaling_factor": float(params["factor"]),
            "rope_low_freq_factor": float(params["low_freq_factor"]),
            "rope_high_freq_factor": float(params["high_freq_factor"]),
            "rope_original_max_position_embeddings": int(params["original_max_position_embeddings"]),
        }
    except KeyError as missing:
        raise ConfigError(f"llama3: the llama3 RoPE parameters in config.json lack {missing}") from None


class Llama3HFAdapter(MappedHFAdapter):
    hf_architectures: tuple[str, ...] = ("LlamaForCausalLM",)
    mapping = MAPPING

    def args_from_hf_config(self, hf_config: dict[str, Any]) -> ModelArgs:
        model_type = hf_config.get("model_type", "llama")
        if model_type != "llama":
            raise ConfigError(f"llama3: config.json has model_type {model_type!r}; expected 'llama'")
        require_hf_keys("llama3", hf_config, _REQUIRED_HF_KEYS)
        unsupported = [flag for flag in ("attention_bias", "mlp_bias") if hf_config.get(flag)]
        if unsupported:
            raise ConfigError(f"llama3: biases are not supported ({', '.join(unsupported)} is true in config.json)")
        if hf_config.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"llama3: hidden_act {hf_config['hidden_act']!r} is not supported; expected 'silu'")
        dim, n_heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
        head_dim = hf_config.get("head_dim")
        if head_dim not in (None, dim // n_heads):
            raise ConfigError(
                f"llama3: head_dim {head_dim} differs from hidden_size / num_attention_heads "
                f"({dim // n_heads}); such models are not supported"
            )
        return ModelArgs(
            dim=dim,
            n_layers=hf_config["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf_config.get("num_key_value_heads") or n_heads,
            vocab_size=hf_config["vocab_size"],
            ffn_hidden_dim=hf_config["intermediate_size"],
            norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
            max_seq_len=int(hf_config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
            **_rope_fields(hf_config),
        )

    def hf_config_from_args(self, args: ModelArgs) -> dict[str, Any]:
        rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": args.rope_theta}
        scaling = args.rope_scaling
        if scaling is not None:
            rope_parameters = {
                "rope_type": "llama3",
                "rope_theta": args.rope_theta,
                "factor": scaling.factor,
                "low_freq_factor": scaling.low_freq_factor,
                "high_freq_factor": scaling.high_freq_factor,
                "original_max_position_embeddings": scaling.original_max_position_embeddings,
            }
        legacy_scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"} if scaling else None
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": args.dim,
            "intermediate_size": args.ffn_dim,
            "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads,
            "num_key_value_heads": args.kv_heads,
            "head_dim": args.head_dim,
            "vocab_size": args.vocab_size,
            "hidden_act": "silu",
            "rms_norm_eps": args.norm_eps,
            "max_position_embeddings": args.max_seq_len,
            "tie_word_embeddings": args.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "rope_parameters": rope_parameters,
            # Read by transformers 4.x, which predates ``rope_parameters``.
            "rope_theta": args.rope_theta,
            "rope_scaling": legacy_scaling,
        }
