"""The llama3 ``ModelSpec``: flavors, FLOPs, tensor-parallel plan, pipeline split points."""
from __future__ import annotations

from plait.model_spec import ModelSpec, TPPlan, even_split_points
from plait_llama3.hf_adapter import Llama3HFAdapter
from plait_llama3.model import ModelArgs, Transformer, count_parameters

FLAVORS: dict[str, ModelArgs] = {
    # Debug sizes use the embedded tokenizer's vocabulary (2048 tokens).
    "debugmodel": ModelArgs(dim=256, n_layers=6, n_heads=16, vocab_size=2048, rope_theta=500000.0),
    "debugmodel_tiny": ModelArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=2048, multiple_of=64, rope_theta=500000.0
    ),
    # debugmodel_tiny with 4 blocks: enough stages for interleaved pipeline schedules.
    "debugmodel_tiny4": ModelArgs(
        dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=2048, multiple_of=64, rope_theta=500000.0
    ),
    # About 100M parameters on the embedded tokenizer: a CPU-sized benchmark job
    # (benchmarks/vs_torchtitan.py), large enough that matmuls dominate the step.
    "100M": ModelArgs(dim=768, n_layers=14, n_heads=12, vocab_size=2048, rope_theta=500000.0),
    # Llama 3.2 1B's blocks on the embedded tokenizer (untied): the GPU benchmark job.
    "1B_embedded_vocab": ModelArgs(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=2048, ffn_dim_multiplier=1.5,
        rope_theta=500000.0,
    ),
    # Published Llama 3.1 sizes (128K context through RoPE frequency scaling).
    "8B": ModelArgs(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        ffn_dim_multiplier=1.3,
        multiple_of=1024,
        rope_theta=500000.0,
        use_rope_scaling=True,
        max_seq_len=131072,
    ),
    "70B": ModelArgs(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        vocab_size=128256,
        ffn_dim_multiplier=1.3,
        multiple_of=4096,
        rope_theta=500000.0,
        use_rope_scaling=True,
        max_seq_len=131072,
    ),
    "405B": ModelArgs(
        dim=16384,
        n_layers=126,
        n_heads=128,
        n_kv_heads=8,
        vocab_size=128256,
        ffn_dim_multiplier=1.2,
        multiple_of=4096,
        rope_theta=500000.0,
        use_rope_scaling=True,
        max_seq_len=131072,
    ),
}

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
    },
    divisible_by_tp=("n_heads", "kv_heads", "ffn_dim"),
)


def build_model(args: ModelArgs) -> Transformer:
    return Transformer(args)


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Forward+backward FLOPs per token: 6 per non-embedding weight plus causal attention scores."""
    weights = count_parameters(args, include_embedding=False)
    attention = 12 * args.n_layers * args.n_heads * args.head_dim * seq_len
    return float(6 * weights + attention)


def pipeline_split_points(args: ModelArgs, num_stages: int) -> list[str]:
    return even_split_points("llama3", args.n_layers, num_stages, tied_embeddings=args.tie_word_embeddings)


def llama3_spec() -> ModelSpec:
    return ModelSpec(
        name="llama3",
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
        hf_adapter=Llama3HFAdapter(),
    )
