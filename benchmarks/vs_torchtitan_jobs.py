"""The jobs that ``vs_torchtitan.py`` runs on plait and on torchtitan, defined once.

Plain Python (no torch, no plait, no torchtitan) so that both systems' runners, which run
in different virtual environments, read the same definition, and a fast test can check
it against plait's flavors. A job is written to a JSON file that each runner loads.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """A Llama 3 decoder: the numbers both systems build their model from."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_dim: int
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def linear_weights(self) -> dict[str, tuple[int, int]]:
        """Every weight matrix used as a linear layer, ``name -> (out_features, in_features)``
        (the embedding is a lookup, not a matmul)."""
        weights = {}
        for layer in range(self.n_layers):
            prefix = f"layers.{layer}"
            weights[f"{prefix}.attention.wq"] = (self.dim, self.dim)
            weights[f"{prefix}.attention.wk"] = (self.kv_dim, self.dim)
            weights[f"{prefix}.attention.wv"] = (self.kv_dim, self.dim)
            weights[f"{prefix}.attention.wo"] = (self.dim, self.dim)
            weights[f"{prefix}.feed_forward.w1"] = (self.ffn_dim, self.dim)
            weights[f"{prefix}.feed_forward.w3"] = (self.ffn_dim, self.dim)
            weights[f"{prefix}.feed_forward.w2"] = (self.dim, self.ffn_dim)
        weights["output"] = (self.vocab_size, self.dim)
        return weights

    def num_parameters(self) -> int:
        """All parameters: linear weights, the embedding and the RMSNorm scales (untied)."""
        linear = sum(o * i for o, i in self.linear_weights().values())
        norms = (2 * self.n_layers + 1) * self.dim
        return linear + self.vocab_size * self.dim + norms


@dataclass(frozen=True, kw_only=True)
class Job:
    """One training job, identical on both systems: model, data layout, optimizer, schedule."""

    name: str
    plait_flavor: str
    """plait's llama3 flavor with exactly ``shape`` (checked by the plait runner and a test)."""
    shape: ModelShape
    seq_len: int
    batch_size: int
    """Sequences per optimizer step (one process, no gradient accumulation)."""
    steps: int
    warmup_steps: int = 2
    """Steps left out of the steady-state throughput (first-step allocation, lazy init)."""
    seed: int = 0
    dtype: str = "float32"
    """Compute dtype; master weights and optimizer state stay float32 on both systems
    (plait: autocast; torchtitan: its FSDP parameter dtype)."""
    device: str = "cpu"
    """``cpu`` or ``cuda`` (one device); the harness's ``--device``."""
    compile: bool = False
    """torch.compile of the model and the loss on both systems; the harness's ``--compile``."""
    float8: str = ""
    """torchao float8 recipe of the linear layers on both systems (``tensorwise``,
    ``rowwise``, ``rowwise_with_gw_hp``), or "" for none; the harness's ``--float8``. Each
    system's own module filter: the output layer stays high precision, and on a GPU each
    skips the linears torchao's thresholds find too small to gain; on CPU both emulate
    the float8 matmuls and convert every other linear."""
    lr: float = 8e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    """On matrices only (norm scales are not decayed), on both systems."""
    max_norm: float = 1.0
    lr_warmup_steps: int = 2
    """Linear LR warm-up, then linear decay to 0 (plait's warmup-stable-decay schedule;
    the harness passes the per-step factors to torchtitan so both follow the same LRs)."""
    lr_factors: tuple[float, ...] = field(default=())
    """Per-step LR multipliers, filled in by the harness from plait's schedule."""

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def with_overrides(self, **changes) -> "Job":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Job":
        data = json.loads(text)
        data["shape"] = ModelShape(**data["shape"])
        data["betas"] = tuple(data["betas"])
        data["lr_factors"] = tuple(data["lr_factors"])
        return cls(**data)


#: plait's ``llama3_debugmodel`` recipe model (flavor ``debugmodel``), a ~100M model (the
#: CPU jobs) and a ~1B model (the GPU job).
JOBS: dict[str, Job] = {
    "debugmodel": Job(
        name="debugmodel",
        plait_flavor="debugmodel",
        shape=ModelShape(dim=256, n_layers=6, n_heads=16, n_kv_heads=16, vocab_size=2048, ffn_dim=768),
        seq_len=256,
        batch_size=8,
        steps=12,
    ),
    "100M": Job(
        name="100M",
        plait_flavor="100M",
        shape=ModelShape(dim=768, n_layers=14, n_heads=12, n_kv_heads=12, vocab_size=2048, ffn_dim=2048),
        seq_len=256,
        batch_size=2,
        steps=6,
    ),
    # The GPU job: ~1B parameters (Llama 3.2 1B's blocks, the embedded tokenizer's
    # vocabulary, untied), bf16 compute, 8K tokens a step; fits one 80 GB GPU without
    # activation checkpointing.
    "1B": Job(
        name="1B",
        plait_flavor="1B_embedded_vocab",
        shape=ModelShape(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=2048, ffn_dim=8192),
        seq_len=2048,
        batch_size=4,
        steps=30,
        warmup_steps=5,
        dtype="bfloat16",
    ),
}


# --------------------------------------------------------------------------- GEMMs


@dataclass(frozen=True, kw_only=True)
class Gemm:
    """One matmul of a training step: ``[m, k] x [k, n]``, done ``count`` times per step."""

    name: str
    kind: str
    """``forward`` (x @ W^T), ``grad_input`` (dy @ W) or ``grad_weight`` (dy^T @ x)."""
    m: int
    n: int
    k: int
    count: int

    @property
    def flops(self) -> int:
        return 2 * self.m * self.n * self.k


def step_gemms(job: Job) -> list[Gemm]:
    """The linear-layer matmuls of one forward+backward of ``job``, grouped by shape.

    A linear ``y[T, out] = x[T, in] @ W^T`` costs three matmuls per step: the forward,
    the input gradient ``dy[T, out] @ W[out, in]`` and the weight gradient
    ``dy^T[out, T] @ x[T, in]``; together ``6 * T * out * in`` FLOPs, the ``6 N`` of the
    model-FLOPs formula. Attention's score matmuls are left out (they run inside SDPA).
    """
    tokens = job.tokens_per_step
    counts: dict[tuple[int, int], int] = {}
    for out_features, in_features in job.shape.linear_weights().values():
        counts[(out_features, in_features)] = counts.get((out_features, in_features), 0) + 1
    gemms = []
    for (out_features, in_features), count in counts.items():
        shape = f"{out_features}x{in_features}"
        gemms += [
            Gemm(name=f"fwd {shape}", kind="forward", m=tokens, n=out_features, k=in_features, count=count),
            Gemm(name=f"dgrad {shape}", kind="grad_input", m=tokens, n=in_features, k=out_features, count=count),
            Gemm(name=f"wgrad {shape}", kind="grad_weight", m=out_features, n=in_features, k=tokens, count=count),
        ]
    return gemms
