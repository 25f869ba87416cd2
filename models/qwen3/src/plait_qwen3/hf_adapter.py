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
from plait.nn import MoEArgs
from plait_qwen3.model import ModelArgs

if TYPE_CHECKING:
    import torch

DENSE_ARCHITECTURE = "Qwen3ForCausalLM"
MOE_ARCHITECTURE = "Qwen3MoeForCausalLM"

_TOP_LEVEL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_PER_LAYER = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_DENSE_FFN = {
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_ROUTER = {"moe.router.gate.weight": "mlp.gate.weight"}
#: our stacked expert weight -> HF per-expert projection name
_EXPERT_PROJECTIONS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
#: HF tensors that carry no weights (older checkpoints saved the RoPE frequencies).
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)
_REQUIRED_HF_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_REQUIRED_MOE_KEYS = ("moe_intermediate_size", "num_experts_per_tok")


def _listed(keys: list[str]) -> str:
    shown = ", ".join(sorted(keys)[:5])
    return shown + (f" (and {len(keys) - 5} more)" if len(keys) > 5 else "")


def _renamed(args: ModelArgs) -> dict[str, str]:
    """plait name -> HF name of every tensor that maps one to one."""
    names = dict(_TOP_LEVEL)
    if args.tie_word_embeddings:
        del names["output.weight"]
    per_layer = {**_PER_LAYER, **(_ROUTER if args.is_moe else _DENSE_FFN)}
    for layer in range(args.n_layers):
        for ours, theirs in per_layer.items():
            names[f"layers.{layer}.{ours}"] = f"model.layers.{layer}.{theirs}"
    return names


def _per_expert_name(layer: int, expert: int, projection: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}.{projection}.weight"


def _fused_names(layer: int) -> tuple[str, str]:
    prefix = f"model.layers.{layer}.mlp.experts"
    return f"{prefix}.gate_up_proj", f"{prefix}.down_proj"


def _rope_theta(hf_config: dict[str, Any]) -> float:
    # transformers 5 writes ``rope_parameters`` (theta inside); older versions write
    # ``rope_theta`` next to an optional ``rope_scaling``.
    params = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(
            f"qwen3: RoPE type {rope_type!r} in config.json (long-context scaling) is not supported; "
            "only the default RoPE is"
        )
    return float(params.get("rope_theta", hf_config.get("rope_theta", 10000.0)))


def _check_supported(hf_config: dict[str, Any]) -> None:
    missing = [key for key in _REQUIRED_HF_KEYS if key not in hf_config]
    if missing:
        raise ConfigError(f"qwen3: config.json lacks {', '.join(missing)}")
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


class Qwen3HFAdapter:
    hf_architectures: tuple[str, ...] = (DENSE_ARCHITECTURE, MOE_ARCHITECTURE)

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

    def from_hf(self, hf_state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
        import torch

        names = _renamed(args)
        missing = [theirs for theirs in names.values() if theirs not in hf_state_dict]
        used = set(names.values())
        state_dict = {ours: hf_state_dict[theirs] for ours, theirs in names.items() if theirs in hf_state_dict}
        if args.moe is not None:
            for layer in range(args.n_layers):
                experts, expert_names = self._experts_from_hf(hf_state_dict, layer, args.moe.num_experts)
                used.update(expert_names)
                if experts is None:
                    missing.extend(expert_names)
                    continue
                for weight, tensor in experts.items():
                    state_dict[f"layers.{layer}.moe.experts.{weight}"] = tensor
                state_dict[f"layers.{layer}.moe.expert_bias"] = torch.zeros(args.moe.num_experts, dtype=torch.float32)
        if missing:
            raise CheckpointError(
                f"qwen3: the HF checkpoint lacks {len(missing)} tensor(s) its config.json implies: {_listed(missing)}"
            )
        if args.tie_word_embeddings:
            used.add("lm_head.weight")  # some tied checkpoints store the copy anyway
            state_dict["output.weight"] = state_dict["tok_embeddings.weight"]
        unexpected = [k for k in hf_state_dict if k not in used and not k.endswith(_IGNORED_HF_SUFFIXES)]
        if unexpected:
            raise CheckpointError(
                f"qwen3: the HF checkpoint has {len(unexpected)} tensor(s) this model does not use: "
                f"{_listed(unexpected)}; is config.json from the same model?"
            )
        return state_dict

    @staticmethod
    def _experts_from_hf(
        hf_state_dict: dict[str, torch.Tensor], layer: int, num_experts: int
    ) -> tuple[dict[str, torch.Tensor] | None, list[str]]:
        """Stacked ``w1/w2/w3`` of one layer and the HF names they come from; None (and
        the names that were looked for) when the layer's experts are absent."""
        import torch

        gate_up_name, down_name = _fused_names(layer)
        if gate_up_name in hf_state_dict and down_name in hf_state_dict:
            gate, up = hf_state_dict[gate_up_name].chunk(2, dim=1)
            return {"w1": gate, "w3": up, "w2": hf_state_dict[down_name]}, [gate_up_name, down_name]
        per_expert = {
            weight: [_per_expert_name(layer, expert, projection) for expert in range(num_experts)]
            for weight, projection in _EXPERT_PROJECTIONS.items()
        }
        expert_names = [name for names in per_expert.values() for name in names]
        if any(name not in hf_state_dict for name in expert_names):
            return None, [name for name in expert_names if name not in hf_state_dict]
        stacked = {weight: torch.stack([hf_state_dict[name] for name in names]) for weight, names in per_expert.items()}
        return stacked, expert_names

    def to_hf(self, state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
        names = _renamed(args)
        expected = set(names)
        if args.tie_word_embeddings:
            expected.add("output.weight")
        if args.moe is not None:
            for layer in range(args.n_layers):
                expected.update(f"layers.{layer}.moe.{name}" for name in ("experts.w1", "experts.w2", "experts.w3",
                                                                          "expert_bias"))  # fmt: skip
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        if missing or unexpected:
            raise CheckpointError(
                "qwen3: the state dict does not match the model args"
                + (f"; missing: {_listed(missing)}" if missing else "")
                + (f"; unexpected: {_listed(unexpected)}" if unexpected else "")
            )
        hf_state_dict = {theirs: state_dict[ours] for ours, theirs in names.items()}
        if args.moe is not None:
            for layer in range(args.n_layers):
                self._check_no_expert_bias(state_dict[f"layers.{layer}.moe.expert_bias"], layer)
                for weight, projection in _EXPERT_PROJECTIONS.items():
                    stacked = state_dict[f"layers.{layer}.moe.experts.{weight}"]
                    for expert, tensor in enumerate(stacked.unbind(0)):
                        hf_state_dict[_per_expert_name(layer, expert, projection)] = tensor
        return hf_state_dict

    @staticmethod
    def _check_no_expert_bias(bias: torch.Tensor, layer: int) -> None:
        full_tensor = getattr(bias, "full_tensor", None)
        if (full_tensor() if full_tensor is not None else bias).any():
            raise CheckpointError(
                f"qwen3: layer {layer} has a non-zero expert bias (trained with --moe.load_balance_coeff > 0); "
                "HF Qwen3-MoE routes without one, so the exported model would choose other experts. Export "
                "checkpoints trained with --moe.load_balance_coeff 0 (balance with --moe.aux_loss_coeff instead)"
            )
