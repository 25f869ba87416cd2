"""The llama3 ``ModelSpec`` (``plait.decoder_spec``): flavors and what differs from the shared decoder."""
from __future__ import annotations

from plait.decoder_spec import decoder_spec
from plait.model_spec import ModelSpec
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


def llama3_spec() -> ModelSpec:
    return decoder_spec(
        "llama3",
        flavors=FLAVORS,
        build=Transformer,
        count_parameters=count_parameters,
        attention_dims=lambda args: (args.n_heads, args.head_dim, args.head_dim),
        attention_tp={"wq": "colwise", "wk": "colwise", "wv": "colwise", "wo": "rowwise"},
        divisible_by_tp=("n_heads", "kv_heads", "ffn_dim"),
        hf_adapter=Llama3HFAdapter(),
    )


_SPEC = llama3_spec()
TP_PLAN = _SPEC.tp_plan
flops_per_token = _SPEC.flops_per_token
pipeline_split_points = _SPEC.pipeline_split_points
