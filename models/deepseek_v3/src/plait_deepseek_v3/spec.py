"""The deepseek_v3 ``ModelSpec``: flavors, FLOPs, tensor-parallel plan, pipeline split
points, expert modules."""
from __future__ import annotations

import dataclasses

from plait.model_spec import ModelSpec, TPPlan, even_split_points
from plait.nn import MoEArgs
from plait_deepseek_v3.hf_adapter import DeepSeekV3HFAdapter
from plait_deepseek_v3.model import ModelArgs, Transformer, count_parameters

# The embedded tokenizer's vocabulary (2048 tokens); one dense block, then MoE blocks
# whose 8 experts form 4 groups of which each token may use 2 (group-limited routing).
_DEBUG = ModelArgs(
    dim=256, n_layers=4, n_dense_layers=1, n_heads=8, vocab_size=2048, inter_dim=768,
    moe=MoEArgs(num_experts=8, top_k=3, hidden_dim=256, num_shared_experts=1, score_func="sigmoid",
                num_groups=4, topk_groups=2, normalize_weights=True, route_scale=1.0, gate_in_float32=True),
    q_lora_rank=0, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    rope_factor=40.0, original_seq_len=4096, max_seq_len=4096,
)  # fmt: skip

FLAVORS: dict[str, ModelArgs] = {
    "debugmodel": _DEBUG,
    # The same with the query's low-rank bottleneck (wq_a -> norm -> wq_b), as the 671B has.
    "debugmodel_q_lora": dataclasses.replace(_DEBUG, q_lora_rank=96),
    # DeepSeek-V2-Lite dimensions (15.7B parameters, 2.4B active): softmax routing
    # without groups, unnormalized weights, plain query projection.
    "16B": ModelArgs(
        dim=2048, n_layers=27, n_dense_layers=1, n_heads=16, vocab_size=102400, inter_dim=10944,
        moe=MoEArgs(num_experts=64, top_k=6, hidden_dim=1408, num_shared_experts=2, score_func="softmax",
                    normalize_weights=False, route_scale=1.0, gate_in_float32=True),
        q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        rope_factor=40.0, original_seq_len=4096, mscale=0.707, max_seq_len=4096,
    ),
    # The published DeepSeek-V3 (671B parameters, 37B active), without its MTP module.
    "671B": ModelArgs(),
}  # fmt: skip

#: Heads and feed-forward features are split over the tp ranks: the latent projections
#: (``wq_a``, ``wkv_a``) and their norms are replicated (every rank computes the latents in
#: full), the rotary key all heads share has its gradient summed (``rope_key``), and the
#: MoE blocks split every expert's hidden features (the tp plugin's "moe" style).
TP_PLAN = TPPlan(
    styles={
        "tok_embeddings": "embedding",
        "norm": "sequence_parallel",
        "output": "output",
        "layers.*.attention_norm": "sequence_parallel",
        "layers.*.attention": "prepare_input",
        "layers.*.attention.wq": "colwise",
        "layers.*.attention.wq_b": "colwise",
        "layers.*.attention.wq_a": "replicate",
        "layers.*.attention.q_norm": "replicate",
        "layers.*.attention.wkv_a": "replicate",
        "layers.*.attention.kv_norm": "replicate",
        "layers.*.attention.wkv_b": "colwise",
        "layers.*.attention.rope_key": "sum_gradient",
        "layers.*.attention.wo": "rowwise",
        "layers.*.ffn_norm": "sequence_parallel",
        "layers.*.feed_forward": "prepare_input",
        "layers.*.feed_forward.w1": "colwise",
        "layers.*.feed_forward.w3": "colwise",
        "layers.*.feed_forward.w2": "rowwise",
        "layers.*.moe": "moe",
    },
    divisible_by_tp=("n_heads", "inter_dim", "moe.hidden_dim"),
)


def build_model(args: ModelArgs) -> Transformer:
    return Transformer(args)


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Forward+backward FLOPs per token: 6 per weight a token uses (attention, the dense
    feed-forward or the ``top_k`` routed plus the shared experts, router, LM head; not the
    embedding) plus the causal attention scores (``q·k`` over ``qk_head_dim``, then
    ``softmax·v`` over ``v_head_dim``)."""
    weights = count_parameters(args, include_embedding=False, active_only=True)
    attention = 6 * args.n_layers * args.n_heads * (args.qk_head_dim + args.v_head_dim) * seq_len
    return float(6 * weights + attention)


def pipeline_split_points(args: ModelArgs, num_stages: int) -> list[str]:
    return even_split_points("deepseek_v3", args.n_layers, num_stages)


def deepseek_v3_spec() -> ModelSpec:
    return ModelSpec(
        name="deepseek_v3",
        flavors=FLAVORS,
        build=build_model,
        flops_per_token=flops_per_token,
        block_container="layers",
        seq_len_arg="max_seq_len",
        tp_plan=TP_PLAN,
        pipeline_split_points=pipeline_split_points,
        expert_modules=("layers.*.moe.experts",),
        hf_adapter=DeepSeekV3HFAdapter(),
    )
