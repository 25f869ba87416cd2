"""The DeepSeek-V3 decoder: token embedding, ``n_layers`` pre-norm blocks, final norm, LM head.

Every block is multi-head latent attention (``plait_deepseek_v3.attention``) followed by a
dense SwiGLU feed-forward in the first ``n_dense_layers`` blocks and by the core's
mixture of experts (``plait.nn.MoE``) in the others: sigmoid (or softmax) scores,
group-limited top-k routing, a load-balancing bias on the choice, normalized and scaled
weights, and shared experts. The multi-token-prediction modules of the published model
are not part of it.
"""
from __future__ import annotations

import torch

from plait.nn import DecoderStack, FeedForward, MoE, PreNormBlock
from plait_deepseek_v3.args import ModelArgs
from plait_deepseek_v3.attention import MultiHeadLatentAttention
from plait_deepseek_v3.rope import rope_table

__all__ = ["ModelArgs", "Transformer", "TransformerBlock", "count_parameters"]


def _attention_parameters(args: ModelArgs) -> int:
    query_width = args.n_heads * args.qk_head_dim
    if args.q_lora_rank:
        queries = args.dim * args.q_lora_rank + args.q_lora_rank + args.q_lora_rank * query_width
    else:
        queries = args.dim * query_width
    keys_values = (
        args.dim * (args.kv_lora_rank + args.qk_rope_head_dim)
        + args.kv_lora_rank
        + args.kv_lora_rank * args.n_heads * (args.qk_nope_head_dim + args.v_head_dim)
    )
    return queries + keys_values + args.n_heads * args.v_head_dim * args.dim


def count_parameters(args: ModelArgs, *, include_embedding: bool = True, active_only: bool = False) -> int:
    """Parameters counted from the args (the LM head is not an embedding). ``active_only``
    counts the experts one token uses: ``top_k`` routed ones plus the shared ones."""
    moe = args.moe
    routed = moe.top_k if active_only else moe.num_experts
    expert_ffn = 3 * args.dim * moe.hidden_dim * (routed + moe.num_shared_experts) + args.dim * moe.num_experts
    per_block = _attention_parameters(args) + 2 * args.dim
    total = (
        args.n_layers * per_block
        + args.n_dense_layers * 3 * args.dim * args.inter_dim
        + args.n_moe_layers * expert_ffn
        + args.dim  # final norm
        + args.vocab_size * args.dim  # LM head
    )
    if include_embedding:
        total += args.vocab_size * args.dim
    return total


class TransformerBlock(PreNormBlock):
    """Pre-norm block; its second half is ``feed_forward`` (the first ``n_dense_layers``) or ``moe``."""

    def __init__(self, layer_id: int, args: ModelArgs) -> None:
        dense = layer_id < args.n_dense_layers
        super().__init__(
            layer_id=layer_id,
            dim=args.dim,
            norm_eps=args.norm_eps,
            attention=MultiHeadLatentAttention(args),
            feed_forward=FeedForward(dim=args.dim, hidden_dim=args.inter_dim) if dense else None,
            moe=None if dense else MoE(dim=args.dim, args=args.moe),
        )


class Transformer(DecoderStack):
    """The DeepSeek-V3 decoder (``plait.nn.DecoderStack``)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(
            vocab_size=args.vocab_size, dim=args.dim, norm_eps=args.norm_eps,
            blocks=[TransformerBlock(i, args) for i in range(args.n_layers)],
            rope_shape=(args.max_seq_len, 2 * args.qk_rope_head_dim),
        )  # fmt: skip
        self.args = args

    def rope_table(self, device: torch.device) -> torch.Tensor:
        args = self.args
        return rope_table(args.qk_rope_head_dim, args.max_seq_len, theta=args.rope_theta, yarn=args.yarn,
                          device=device)  # fmt: skip
