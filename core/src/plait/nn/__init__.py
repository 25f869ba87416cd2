"""Building blocks shared by the model packages: norms, RoPE, attention, feed-forward."""
from plait.nn.attention import Attention, ScaledDotProductAttention
from plait.nn.feed_forward import FeedForward, swiglu_hidden_dim
from plait.nn.norms import RMSNorm
from plait.nn.rope import RopeScaling, apply_rope, rope_cache, rope_inv_freq

__all__ = [
    "Attention",
    "FeedForward",
    "RMSNorm",
    "RopeScaling",
    "ScaledDotProductAttention",
    "apply_rope",
    "rope_cache",
    "rope_inv_freq",
    "swiglu_hidden_dim",
]
