"""A causal MLP-mixer LM: token mixing with a lower-triangular learned matrix."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from plait.model_spec import ModelSpec


@dataclass(kw_only=True, frozen=True)
class TinyLMArgs:
    vocab_size: int = 2048
    dim: int = 64
    n_layers: int = 2
    max_seq_len: int = 256


class MixerBlock(nn.Module):
    def __init__(self, args: TinyLMArgs) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(args.dim)
        self.token_mix = nn.Parameter(torch.empty(args.max_seq_len, args.max_seq_len))
        self.norm2 = nn.LayerNorm(args.dim)
        self.up = nn.Linear(args.dim, 4 * args.dim)
        self.down = nn.Linear(4 * args.dim, args.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.shape[1]
        mix = torch.tril(self.token_mix[:seq, :seq])
        x = x + torch.einsum("ts,bsd->btd", mix, self.norm1(x))
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm2(x))))


class TinyLM(nn.Module):
    def __init__(self, args: TinyLMArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): MixerBlock(args) for i in range(args.n_layers)})
        self.norm = nn.LayerNorm(args.dim)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for block in self.layers.values():
            h = block(h)
        return self.output(self.norm(h))

    def init_weights(self) -> None:
        nn.init.normal_(self.tok_embeddings.weight, std=0.02)
        for block in self.layers.values():
            seq = torch.arange(1, self.args.max_seq_len + 1, dtype=torch.float32)
            block.token_mix.copy_(torch.ones_like(block.token_mix) / seq[:, None])  # causal mean
            for norm in (block.norm1, block.norm2):
                nn.init.ones_(norm.weight)
                nn.init.zeros_(norm.bias)
            for linear in (block.up, block.down):
                nn.init.normal_(linear.weight, std=0.02)
                nn.init.zeros_(linear.bias)
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)
        nn.init.normal_(self.output.weight, std=0.02)


def _flops_per_token(args: TinyLMArgs, seq_len: int) -> float:
    """Forward+backward: 6 per matmul weight (``up``, ``down``, the LM head) plus the token
    mix, ``2 * seq_len * dim`` per token forward (the full square, as einsum computes it)."""
    per_block = 8 * args.dim * args.dim + seq_len * args.dim
    return 6.0 * (args.n_layers * per_block + args.dim * args.vocab_size)


SPEC = ModelSpec(
    name="tinylm",
    flavors={"debugmodel": TinyLMArgs(), "wide": TinyLMArgs(dim=128, n_layers=4)},
    build=TinyLM,
    flops_per_token=_flops_per_token,
)
