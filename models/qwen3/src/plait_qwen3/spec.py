"""The qwen3 ``ModelSpec``: flavors, FLOPs, tensor-parallel plan, pipeline split points,
expert modules."""
from __future__ import annotations

from plait.model_spec import ModelSpec, TPPlan, even_split_points
from plait.nn import MoEArgs
from plait_qwen3.hf_adapter import Qwen3HFAdapter
from plait_qwen3.model import ModelArgs, Transformer, count_parameters


def _dense(dim: int, n_layers: int, n_heads: int, ffn_hidden_dim: int, *, tie: bool) -> ModelArgs:
    return ModelArgs(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=8, ffn_hidden_dim=ffn_hidden_dim,
        tie_word_embeddings=tie,
    )  # fmt: skip


def _moe(dim: int, n_layers: int, n_heads: int, ffn_hidden_dim: int, expert_hidden_dim: int) -> ModelArgs:
    return ModelArgs(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=4, ffn_hidden_dim=ffn_hidden_dim,
        moe=MoEArgs(num_experts=128, top_k=8, hidden_dim=expert_hidden_dim, normalize_weights=True),
    )  # fmt: skip


FLAVORS: dict[str, ModelArgs] = {
    # Debug sizes use the embedded tokenizer's vocabulary (2048 tokens); like the published
    # models, their query width (n_heads * head_dim) differs from dim.
    "debugmodel": ModelArgs(
        dim=256, n_layers=6, n_heads=8, n_kv_heads=4, head_dim=64, vocab_size=2048, ffn_hidden_dim=768,
        max_seq_len=4096,
    ),
    "debugmodel_moe": ModelArgs(
        dim=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=64, vocab_size=2048, ffn_hidden_dim=768,
        max_seq_len=4096, moe=MoEArgs(num_experts=8, top_k=2, hidden_dim=256, normalize_weights=True),
    ),
    # Published sizes (head_dim 128, vocabulary 151936, RoPE theta 1e6, 40960 positions).
    "0.6B": _dense(1024, 28, 16, 3072, tie=True),
    "1.7B": _dense(2048, 28, 16, 6144, tie=True),
    "4B": _dense(2560, 36, 32, 9728, tie=True),
    "8B": _dense(4096, 36, 32, 12288, tie=False),
    "14B": _dense(5120, 40, 40, 17408, tie=False),
    "32B": _dense(5120, 64, 64, 25600, tie=False),
    "30B-A3B": _moe(2048, 48, 32, 6144, 768),
    "235B-A22B": _moe(4096, 94, 64, 12288, 1536),
}  # fmt: skip

#: Dense blocks follow the Llama layout; the per-head q/k norms stay replicated with
#: gradients summed over the tp ranks (see ``plait_qwen3.tensor_parallel``). MoE blocks
#: split every expert's hidden features over the tp ranks (the tp plugin's "moe" style).
TP_PLAN = TPPlan(
    styles={
        "tok_embeddings": "embedding",
        "norm": "sequence_parallel",
        "output": "output",
        "layers.*.attention_norm": "sequence_parallel",
        "layers.*.attention": "prepare_input",
        "layers.*.attention.wq": "colwise",
        "layers.*.attention.wk": "colwise",
        "layers.*.attention.wv": "colwise",
        "layers.*.attention.wo": "rowwise",
        "layers.*.ffn_norm": "sequence_parallel",
        "layers.*.feed_forward": "prepare_input",
        "layers.*.feed_forward.w1": "colwise",
        "layers.*.feed_forward.w3": "colwise",
        "layers.*.feed_forward.w2": "rowwise",
        "layers.*.moe": "moe",
    },
    divisible_by_tp=("n_heads", "kv_heads", "ffn_dim", "moe.hidden_dim"),
)


def build_model(args: ModelArgs) -> Transformer:
    return Transformer(args)


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Forward+backward FLOPs per token: 6 per weight a token uses (for MoE the active
    experts only; LM head included, embedding not) plus causal attention scores."""
    weights = count_parameters(args, include_embedding=False, active_only=True)
    attention = 12 * args.n_layers * args.n_heads * args.head_dim * seq_len
    return float(6 * weights + attention)


def pipeline_split_points(args: ModelArgs, num_stages: int) -> list[str]:
    return even_split_points("qwen3", args.n_layers, num_stages, tied_embeddings=args.tie_word_embeddings)


def qwen3_spec() -> ModelSpec:
    return ModelSpec(
        name="qwen3",
        flavors=FLAVORS,
        build=build_model,
        flops_per_token=flops_per_token,
        block_container="layers",
        seq_len_arg="max_seq_len",
        tp_plan=TP_PLAN,
        pipeline_split_points=pipeline_split_points,
        cp_attention="sdpa",
        cp_attention_modules=("layers.*.attention.sdpa",),
        cp_sequence_buffers={"rope_cache": 0},
        expert_modules=("layers.*.moe.experts",),
        hf_adapter=Qwen3HFAdapter(),
    )
