"""DeepSeek-V3's hyperparameters (``ModelArgs``), in a module of their own so that the model
and its attention both import them without importing each other."""
from __future__ import annotations

from dataclasses import dataclass

from plait.errors import ConfigError
from plait.nn import MoEArgs
from plait_deepseek_v3.rope import Yarn


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelArgs:
    """DeepSeek-V3 hyperparameters. Frozen: derive variants with ``dataclasses.replace``."""

    dim: int = 7168
    n_layers: int = 61
    n_dense_layers: int = 3
    """The first blocks use a dense feed-forward instead of experts (HF ``first_k_dense_replace``)."""
    n_heads: int = 128
    vocab_size: int = 129280
    inter_dim: int = 18432
    """Width of the dense SwiGLU of the first ``n_dense_layers`` blocks."""
    moe: MoEArgs = MoEArgs(
        num_experts=256, top_k=8, hidden_dim=2048, num_shared_experts=1, score_func="sigmoid",
        num_groups=8, topk_groups=4, normalize_weights=True, route_scale=2.5, gate_in_float32=True,
    )  # fmt: skip
    """The experts of the other blocks (``hidden_dim`` is DeepSeek's ``moe_inter_dim``)."""
    q_lora_rank: int = 1536
    """Rank of the query bottleneck; 0 projects the queries with one plain ``wq``."""
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    original_seq_len: int = 4096
    """Context of pretraining; YaRN applies when ``max_seq_len`` exceeds it."""
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    max_seq_len: int = 4096
    """Longest sequence the RoPE table covers (the trainer sets it to the run's seq_len)."""

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def yarn(self) -> Yarn | None:
        """The YaRN stretch, when the model runs past its pretraining context; else None."""
        if self.max_seq_len <= self.original_seq_len or self.rope_factor <= 1:
            return None
        return Yarn(
            factor=self.rope_factor, original_seq_len=self.original_seq_len,
            beta_fast=self.beta_fast, beta_slow=self.beta_slow, mscale=self.mscale,
        )  # fmt: skip

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim ** -0.5``, times YaRN's ``mscale ** 2`` when YaRN applies."""
        scale = self.qk_head_dim**-0.5
        yarn = self.yarn
        return scale if yarn is None else scale * yarn.softmax_mscale**2

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    def __post_init__(self) -> None:
        if not 0 <= self.n_dense_layers <= self.n_layers:
            raise ConfigError(
                f"deepseek_v3: n_dense_layers ({self.n_dense_layers}) must be between 0 and n_layers ({self.n_layers})"
            )
        if self.q_lora_rank < 0 or self.kv_lora_rank < 1:
            raise ConfigError(
                f"deepseek_v3: q_lora_rank ({self.q_lora_rank}) must be >= 0 and kv_lora_rank "
                f"({self.kv_lora_rank}) positive"
            )
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim < 2:
            raise ConfigError(
                f"deepseek_v3: qk_rope_head_dim ({self.qk_rope_head_dim}) must be even and positive for RoPE"
            )
