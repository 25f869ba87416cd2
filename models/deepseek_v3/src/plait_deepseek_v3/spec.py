"""The deepseek_v3 ``ModelSpec`` (``plait.decoder_spec``): flavors and what differs from the
shared decoder (latent attention's TP styles; no context parallelism)."""
from __future__ import annotations

import dataclasses

from plait.decoder_spec import decoder_spec
from plait.model_spec import ModelSpec
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

def deepseek_v3_spec() -> ModelSpec:
    """Heads and feed-forward features are split over the tp ranks: the latent projections
    (``wq_a``, ``wkv_a``) and their norms are replicated (every rank computes the latents
    in full), the rotary key all heads share has its gradient summed (``rope_key``), and
    the MoE blocks split every expert's hidden features (the tp plugin's "moe" style)."""
    return decoder_spec(
        "deepseek_v3",
        flavors=FLAVORS,
        build=Transformer,
        count_parameters=count_parameters,
        attention_dims=lambda args: (args.n_heads, args.qk_head_dim, args.v_head_dim),
        attention_tp={
            "wq": "colwise", "wq_b": "colwise", "wq_a": "replicate", "q_norm": "replicate", "wkv_a": "replicate",
            "kv_norm": "replicate", "wkv_b": "colwise", "rope_key": "sum_gradient", "wo": "rowwise",
        },
        divisible_by_tp=("n_heads", "inter_dim", "moe.hidden_dim"),
        moe=True,
        context_parallel=False,
        hf_adapter=DeepSeekV3HFAdapter(),
    )  # fmt: skip


_SPEC = deepseek_v3_spec()
TP_PLAN = _SPEC.tp_plan
flops_per_token = _SPEC.flops_per_token
pipeline_split_points = _SPEC.pipeline_split_points
