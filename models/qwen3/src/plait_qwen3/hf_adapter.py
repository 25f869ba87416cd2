"""Conversion between plait's qwen3 and Hugging Face's ``Qwen3ForCausalLM`` (dense,
``model_type`` "qwen3") and ``Qwen3MoeForCausalLM`` (``model_type`` "qwen3_moe").

Both sides use the rotate-half RoPE layout, so attention and dense tensors map one to one
by name. The routed experts are 3-D tensors here (``moe.experts.w1/w2/w3``,
``[expert, out, in]``); HF folders store them per expert
(``mlp.experts.{e}.gate_proj/up_proj/down_proj.weight``: the official checkpoints and
what transformers 5 saves), and some tools store them fused
(``mlp.experts.gate_up_proj`` ``[expert, 2 * hidden, dim]`` and ``mlp.experts.down_proj``);
import reads both, export writes per expert. HF has no expert bias: import sets it to
zero and export refuses a bias that load balancing has moved.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from plait.errors import CheckpointError, ConfigError
from plait.hf_mapping import (
    HF_BLOCK_NORMS,
    HF_DECODER_ENDS,
    HF_FEED_FORWARD,
    HFMapping,
    MappedHFAdapter,
    NotInHF,
    StackedExperts,
    hf_rope,
    layer_renames,
    renames,
    require_hf_keys,
)
from plait.nn import MoEArgs
from plait_qwen3.model import ModelArgs

if TYPE_CHECKING:
    import torch

DENSE_ARCHITECTURE = "Qwen3ForCausalLM"
MOE_ARCHITECTURE = "Qwen3MoeForCausalLM"
_REQUIRED_HF_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_REQUIRED_MOE_KEYS = ("moe_intermediate_size", "num_experts_per_tok")


def _dense_layers(args: ModelArgs) -> range:
    return range(args.n_layers if args.moe is None else 0)


def _moe_layers(args: ModelArgs) -> range:
    return range(args.n_layers if args.moe is not None else 0)


def _zero_expert_bias(args: ModelArgs) -> torch.Tensor:
    import torch

    return torch.zeros(args.moe.num_experts, dtype=torch.float32)


def _refuse_expert_bias(bias: torch.Tensor, layer: int) -> None:
    if bias.any():
        raise CheckpointError(
            f"qwen3: layer {layer} has a non-zero expert bias (trained with --moe.load_balance_coeff > 0); "
            "HF Qwen3-MoE routes without one, so the exported model would choose other experts. Export "
            "checkpoints trained with --moe.load_balance_coeff 0 (balance with --moe.aux_loss_coeff instead)"
        )


MAPPING = HFMapping(
    model="qwen3",
    entries=[
        *renames(HF_DECODER_ENDS),
        *layer_renames({
            **HF_BLOCK_NORMS,
            "attention.wq.weight": "self_attn.q_proj.weight",
            "attention.wk.weight": "self_attn.k_proj.weight",
            "attention.wv.weight": "self_attn.v_proj.weight",
            "attention.wo.weight": "self_attn.o_proj.weight",
            "attention.q_norm.weight": "self_attn.q_norm.weight",
            "attention.k_norm.weight": "self_attn.k_norm.weight",
        }),
        *layer_renames(HF_FEED_FORWARD, layers=_dense_layers),
        *layer_renames({"moe.router.gate.weight": "mlp.gate.weight"}, layers=_moe_layers),
        StackedExperts(layers=_moe_layers),
        # HF has no expert bias: import sets it to zero, export refuses one that balancing moved
        NotInHF("layers.{layer}.moe.expert_bias", init=_zero_expert_bias, layers=_moe_layers, check=_refuse_expert_bias),
    ],
)  # fmt: skip


def _rope_theta(hf_config: dict[str, Any]) -> float:
    rope = hf_rope(hf_config)
    if rope.rope_type != "default":
        raise ConfigError(
            f"qwen3: RoPE type {rope.rope_type!r} in config.json (long-context scaling) is not supported; "
            "only the default RoPE is"
        )
    return rope.theta


def _check_supported(hf_config: dict[str, Any]) -> None:
    require_hf_keys("qwen3", hf_config, _REQUIRED_HF_KEYS)
    if hf_config.get("attention_bias"):
        raise ConfigError("qwen3: attention biases are not supported (attention_bias is true in config.json)")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"qwen3: hidden_act {hf_config['hidden_act']!r} is not supported; expected 'silu'")
    layer_types = hf_config.get("layer_types") or []
    if hf_config.get("use_sliding_window") or any(kind != "full_attention" for kind in layer_types):
        raise ConfigError(
            "qwen3: sliding-window attention (use_sliding_window / layer_types in config.json) is not supported"
        )


def _moe_args(hf_config: dict[str, Any]) -> MoEArgs:
    missing = [key for key in _REQUIRED_MOE_KEYS if key not in hf_config]
    num_experts = hf_config.get("num_experts", hf_config.get("num_local_experts"))
    if num_experts is None:
        missing.append("num_experts")
    if missing:
        raise ConfigError(f"qwen3: the qwen3_moe config.json lacks {', '.join(missing)}")
    if hf_config.get("decoder_sparse_step", 1) != 1 or hf_config.get("mlp_only_layers"):
        raise ConfigError(
            "qwen3: MoE checkpoints whose layers mix dense and expert MLPs (decoder_sparse_step != 1 or "
            "mlp_only_layers in config.json) are not supported; every layer must be an MoE layer"
        )
    return MoEArgs(
        num_experts=int(num_experts),
        top_k=int(hf_config["num_experts_per_tok"]),
        hidden_dim=int(hf_config["moe_intermediate_size"]),
        normalize_weights=bool(hf_config.get("norm_topk_prob", False)),
    )


class Qwen3HFAdapter(MappedHFAdapter):
    hf_architectures: tuple[str, ...] = (DENSE_ARCHITECTURE, MOE_ARCHITECTURE)
    mapping = MAPPING

    def args_from_hf_config(self, hf_config: dict[str, Any]) -> ModelArgs:
        model_type = hf_config.get("model_type", "qwen3")
        if model_type not in ("qwen3", "qwen3_moe"):
            raise ConfigError(f"qwen3: config.json has model_type {model_type!r}; expected 'qwen3' or 'qwen3_moe'")
        _check_supported(hf_config)
        return ModelArgs(
            dim=hf_config["hidden_size"],
            n_layers=hf_config["num_hidden_layers"],
            n_heads=hf_config["num_attention_heads"],
            n_kv_heads=hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"],
            head_dim=int(hf_config.get("head_dim") or 128),  # transformers' default for Qwen3
            vocab_size=hf_config["vocab_size"],
            ffn_hidden_dim=hf_config["intermediate_size"],
            moe=_moe_args(hf_config) if model_type == "qwen3_moe" else None,
            norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(hf_config),
            max_seq_len=int(hf_config.get("max_position_embeddings", 40960)),
            tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        )

    def hf_config_from_args(self, args: ModelArgs) -> dict[str, Any]:
        config: dict[str, Any] = {
            "architectures": [MOE_ARCHITECTURE if args.is_moe else DENSE_ARCHITECTURE],
            "model_type": "qwen3_moe" if args.is_moe else "qwen3",
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
            "use_sliding_window": False,
            "sliding_window": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
            "rope_theta": args.rope_theta,  # read by transformers 4.x, which predates rope_parameters
            "rope_scaling": None,
        }
        if args.moe is not None:
            moe = args.moe
            if (moe.score_func, moe.num_groups, moe.num_shared_experts, moe.route_scale) != ("softmax", 1, 0, 1.0):
                raise ConfigError(
                    "qwen3: HF Qwen3-MoE routes by softmax top-k without expert groups, shared experts or a "
                    f"routing scale; these MoE args have no HF equivalent: {moe}"
                )
            config.update(
                num_experts=moe.num_experts,
                num_experts_per_tok=moe.top_k,
                moe_intermediate_size=moe.hidden_dim,
                norm_topk_prob=moe.normalize_weights,
                decoder_sparse_step=1,
                mlp_only_layers=[],
            )
        return config
