"""Building blocks shared by the model packages: norms, RoPE, attention, feed-forward,
mixture of experts, weight initialization (``plait.nn.init``)."""
from plait.nn import init
from plait.nn.attention import Attention, ScaledDotProductAttention
from plait.nn.decoder import DecoderStack, PreNormBlock
from plait.nn.feed_forward import FeedForward, swiglu_hidden_dim
from plait.nn.head_shared import HeadShared
from plait.nn.init import trunc_normal_
from plait.nn.moe import (
    DispatchedTokens,
    GroupedExperts,
    LocalTokenDispatcher,
    MoE,
    MoEArgs,
    MoETensorParallel,
    Routing,
    TokenDispatcher,
    TopKRouter,
    load_balance_loss,
)
from plait.nn.norms import RMSNorm
from plait.nn.rope import RopeScaling, apply_rope, rope_cache, rope_inv_freq

__all__ = [
    "Attention",
    "DecoderStack",
    "DispatchedTokens",
    "FeedForward",
    "GroupedExperts",
    "HeadShared",
    "LocalTokenDispatcher",
    "MoE",
    "MoEArgs",
    "MoETensorParallel",
    "PreNormBlock",
    "RMSNorm",
    "RopeScaling",
    "Routing",
    "ScaledDotProductAttention",
    "TokenDispatcher",
    "TopKRouter",
    "apply_rope",
    "init",
    "load_balance_loss",
    "rope_cache",
    "rope_inv_freq",
    "swiglu_hidden_dim",
    "trunc_normal_",
]
