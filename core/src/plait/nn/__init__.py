"""Building blocks shared by the model packages: norms, RoPE, attention, feed-forward,
mixture of experts."""
from plait.nn.attention import Attention, ScaledDotProductAttention
from plait.nn.feed_forward import FeedForward, swiglu_hidden_dim
from plait.nn.moe import (
    DispatchedTokens,
    GroupedExperts,
    LocalTokenDispatcher,
    MoE,
    MoEArgs,
    Routing,
    TokenDispatcher,
    TopKRouter,
    load_balance_loss,
)
from plait.nn.norms import RMSNorm
from plait.nn.rope import RopeScaling, apply_rope, rope_cache, rope_inv_freq

__all__ = [
    "Attention",
    "DispatchedTokens",
    "FeedForward",
    "GroupedExperts",
    "LocalTokenDispatcher",
    "MoE",
    "MoEArgs",
    "RMSNorm",
    "RopeScaling",
    "Routing",
    "ScaledDotProductAttention",
    "TokenDispatcher",
    "TopKRouter",
    "apply_rope",
    "load_balance_loss",
    "rope_cache",
    "rope_inv_freq",
    "swiglu_hidden_dim",
]
