"""The qwen3 ``ModelSpec`` (``plait.decoder_spec``): flavors and what differs from the
shared decoder (per-head q/k norms made tensor-parallel by ``plait_qwen3.tensor_parallel``)."""
from __future__ import annotations

from plait.decoder_spec import decoder_spec
from plait.model_spec import ModelSpec
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


def _parallelize_head_norms(model, tp_mesh) -> None:  # noqa: ANN001 - TPPlan.extra's signature
    """The per-head q/k norms stay replicated with gradients summed over the tp ranks."""
    from plait_qwen3.tensor_parallel import parallelize_head_norms

    parallelize_head_norms(model, tp_mesh)


def qwen3_spec() -> ModelSpec:
    """Dense blocks follow the Llama layout; MoE blocks split every expert's hidden
    features over the tp ranks (the tp plugin's "moe" style)."""
    return decoder_spec(
        "qwen3",
        flavors=FLAVORS,
        build=Transformer,
        count_parameters=count_parameters,
        attention_dims=lambda args: (args.n_heads, args.head_dim, args.head_dim),
        attention_tp={"wq": "colwise", "wk": "colwise", "wv": "colwise", "wo": "rowwise"},
        divisible_by_tp=("n_heads", "kv_heads", "ffn_dim", "moe.hidden_dim"),
        moe=True,
        tp_extra=_parallelize_head_norms,
        tp_extra_covers=("layers.*.attention.q_norm", "layers.*.attention.k_norm"),
        hf_adapter=Qwen3HFAdapter(),
    )


_SPEC = qwen3_spec()
TP_PLAN = _SPEC.tp_plan
flops_per_token = _SPEC.flops_per_token
pipeline_split_points = _SPEC.pipeline_split_points
