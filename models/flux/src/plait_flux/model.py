"""The FLUX.1 transformer: double-stream blocks (image and text tokens with their own
weights, one joint attention), then single-stream blocks over the concatenated tokens;
3-axis RoPE over (0, row, col) position ids; every block modulated (shift, scale, gate)
by the timestep embedding (plus the guidance embedding on flux-dev) and the pooled text
vector; RMSNorm on queries and keys.

Module names follow the reference checkpoints inside each block, except that the fused
projections are kept apart (q, k, v and the single-stream MLP input and output) so that
tensor parallelism can shard them. The blocks live in one ``nn.ModuleDict`` ``blocks``
(the double-stream ones first, ``"0"`` .. ``"depth-1"``, then the single-stream ones), so
FSDP, activation checkpointing and compile wrap them one by one like any model's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(kw_only=True, frozen=True)
class FluxArgs:
    in_channels: int = 64
    """Features of a packed image token: 16 latent channels × a 2×2 patch."""
    out_channels: int = 64
    vec_in_dim: int = 768
    """Width of the pooled text vector (CLIP's)."""
    context_in_dim: int = 4096
    """Width of the text token embeddings (T5's)."""
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    """Double-stream blocks."""
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    """RoPE width of each position axis; they add up to the head width."""
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True
    """flux-dev's distilled guidance: the guidance scale is an input of the model."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def n_blocks(self) -> int:
        return self.depth + self.depth_single_blocks


# ----------------------------------------------------------------------------- embeddings


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0, time_factor: float = 1000.0
                       ) -> torch.Tensor:  # fmt: skip
    """Sinusoidal embedding ``[cos | sin]`` of ``time_factor * t`` (timesteps in [0, 1])."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding.to(t) if torch.is_floating_point(t) else embedding


def rope(pos: torch.Tensor, dim: int, theta: int) -> torch.Tensor:
    """Rotation matrices ``[..., n, dim/2, 2, 2]`` for positions ``pos`` ``[..., n]``."""
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta**scale)
    angles = pos.to(torch.float64)[..., None] * omega
    rotation = torch.stack([torch.cos(angles), -torch.sin(angles), torch.sin(angles), torch.cos(angles)], dim=-1)
    return rotation.unflatten(-1, (2, 2)).float()


def positional_embedding(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: int) -> torch.Tensor:
    """RoPE of position ids ``[B, L, n_axes]`` (or ``[L, n_axes]``): ``[B, 1, L, head_dim/2, 2, 2]``."""
    if ids.dim() == 2:
        ids = ids[None]
    rotations = [rope(ids[..., axis], axes_dim[axis], theta) for axis in range(ids.shape[-1])]
    return torch.cat(rotations, dim=-3).unsqueeze(1)


def apply_rope(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    rotated = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]
    return rotated.reshape(*x.shape).type_as(x)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


# ----------------------------------------------------------------------------- attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rrms = torch.rsqrt(torch.mean(x.float() ** 2, dim=-1, keepdim=True) + 1e-6)
        return (x.float() * rrms).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class Attention(nn.Module):
    """Bidirectional scaled dot-product attention, as a module of its own so that context
    parallelism can wrap it: ``q, k, v`` ``[batch, heads, seq, head_dim]`` (RoPE applied)
    in, the same layout out."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[B, L, H * D]`` -> ``[B, H, L, D]`` (heads counted with -1, so a tensor-parallel
    shard of the heads reshapes the same way)."""
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, D]`` -> ``[B, L, H * D]``."""
    return x.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """One stream's projections of a double-stream block. The reference checkpoints fuse
    q, k and v into one ``qkv`` projection; plait keeps them apart so that tensor
    parallelism can shard each by heads (the checkpoint adapters fuse and split them)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.norm = QKNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normed q, k and v ``[B, H, L, D]`` of the modulated input (RoPE not yet applied)."""
        q, k, v = (split_heads(proj(x), self.head_dim) for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = self.norm(q, k, v)
        return q, k, v


class Modulation(nn.Module):
    """(shift, scale, gate) once (single-stream) or twice (double-stream: attention, MLP)."""

    def __init__(self, dim: int, *, double: bool) -> None:
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec: torch.Tensor) -> list[torch.Tensor]:
        return list(self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1))


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class DoubleStreamBlock(nn.Module):
    def __init__(self, args: FluxArgs) -> None:
        super().__init__()
        dim = args.hidden_size
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", Modulation(dim, double=True))
            setattr(self, f"{stream}_norm1", _layer_norm(dim))
            setattr(self, f"{stream}_attn", SelfAttention(dim, args.num_heads, args.qkv_bias))
            setattr(self, f"{stream}_norm2", _layer_norm(dim))
            setattr(self, f"{stream}_mlp", _mlp(dim, args.mlp_hidden_dim))
        self.attention = Attention()

    def _qkv(self, stream: str, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor):
        modulated = (1 + scale) * getattr(self, f"{stream}_norm1")(x) + shift
        return getattr(self, f"{stream}_attn").qkv(modulated)

    def _finish(self, stream: str, x: torch.Tensor, attended: torch.Tensor, mod: list[torch.Tensor]) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = mod
        x = x + gate1 * getattr(self, f"{stream}_attn").proj(attended)
        return x + gate2 * getattr(self, f"{stream}_mlp")((1 + scale2) * getattr(self, f"{stream}_norm2")(x) + shift2)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        img_mod, txt_mod = self.img_mod(vec), self.txt_mod(vec)
        img_q, img_k, img_v = self._qkv("img", img, img_mod[0], img_mod[1])
        txt_q, txt_k, txt_v = self._qkv("txt", txt, txt_mod[0], txt_mod[1])
        q = apply_rope(torch.cat((txt_q, img_q), dim=2), pe)
        k = apply_rope(torch.cat((txt_k, img_k), dim=2), pe)
        attended = merge_heads(self.attention(q, k, torch.cat((txt_v, img_v), dim=2)))
        n_txt = txt.shape[1]
        img = self._finish("img", img, attended[:, n_txt:], img_mod)
        txt = self._finish("txt", txt, attended[:, :n_txt], txt_mod)
        return img, txt


class SingleStreamBlock(nn.Module):
    """Attention and MLP in parallel on one modulated input, summed into the residual.

    The reference checkpoints fuse q, k, v and the MLP input into one ``linear1`` and the
    attention and MLP outputs into one ``linear2``; plait keeps the six projections apart
    so that tensor parallelism can shard each (heads, MLP features) on its own, and the
    checkpoint adapters fuse and split them."""

    def __init__(self, args: FluxArgs) -> None:
        super().__init__()
        dim = self.hidden_size = args.hidden_size
        self.head_dim = args.head_dim
        self.mlp_hidden_dim = args.mlp_hidden_dim
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.mlp_in = nn.Linear(dim, self.mlp_hidden_dim)
        self.attn_out = nn.Linear(dim, dim)
        self.mlp_out = nn.Linear(self.mlp_hidden_dim, dim, bias=False)  # linear2's one bias is attn_out's
        self.norm = QKNorm(self.head_dim)
        self.pre_norm = _layer_norm(dim)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(dim, double=False)
        self.attention = Attention()

    def forward(self, x: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(vec)
        modulated = (1 + scale) * self.pre_norm(x) + shift
        q, k, v = (split_heads(proj(modulated), self.head_dim) for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = self.norm(q, k, v)
        attended = merge_heads(self.attention(apply_rope(q, pe), apply_rope(k, pe), v))
        return x + gate * (self.attn_out(attended) + self.mlp_out(self.mlp_act(self.mlp_in(modulated))))


class LastLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = _layer_norm(dim)
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear((1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :])


# ----------------------------------------------------------------------------- the model


class Flux(nn.Module):
    def __init__(self, args: FluxArgs) -> None:
        super().__init__()
        if args.hidden_size % args.num_heads:
            raise ValueError(f"hidden_size {args.hidden_size} is not a multiple of num_heads {args.num_heads}")
        if sum(args.axes_dim) != args.head_dim:
            raise ValueError(f"axes_dim {list(args.axes_dim)} must add up to the head width {args.head_dim}")
        self.args = args
        dim = args.hidden_size
        self.img_in = nn.Linear(args.in_channels, dim)
        self.time_in = MLPEmbedder(256, dim)
        self.vector_in = MLPEmbedder(args.vec_in_dim, dim)
        self.guidance_in = MLPEmbedder(256, dim) if args.guidance_embed else None
        self.txt_in = nn.Linear(args.context_in_dim, dim)
        self.blocks = nn.ModuleDict(
            {str(i): DoubleStreamBlock(args) for i in range(args.depth)}
            | {str(args.depth + i): SingleStreamBlock(args) for i in range(args.depth_single_blocks)}
        )
        self.final_layer = LastLayer(dim, args.out_channels)

    def forward(self, img: torch.Tensor, img_ids: torch.Tensor, txt: torch.Tensor, txt_ids: torch.Tensor,
                timesteps: torch.Tensor, y: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        """``img`` [B, L_img, in_channels] packed latents; ids [L, 3] or [B, L, 3]; ``txt``
        [B, L_txt, context_in_dim]; ``timesteps`` [B] in [0, 1]; ``y`` [B, vec_in_dim] pooled
        text; ``guidance`` [B] the guidance scale (flux-dev). Returns [B, L_img, out_channels]."""
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this flux flavor embeds the guidance scale: pass guidance [B]")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        if txt_ids.dim() != img_ids.dim():
            txt_ids, img_ids = _same_rank(txt_ids, img_ids)
        pe = positional_embedding(torch.cat((txt_ids, img_ids), dim=-2), self.args.axes_dim, self.args.theta)
        n_txt = txt.shape[1]
        x = None
        for index, block in enumerate(self.blocks.values()):  # by position: AC and compile wrap the blocks
            if index < self.args.depth:
                img, txt = block(img, txt, vec, pe)
            else:
                if x is None:
                    x = torch.cat((txt, img), dim=1)
                x = block(x, vec, pe)
        x = torch.cat((txt, img), dim=1) if x is None else x
        return self.final_layer(x[:, n_txt:], vec)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Linear weights N(0, 0.02), biases 0, norm scales 1 (no buffers to fill)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.scale)


def _same_rank(txt_ids: torch.Tensor, img_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Give ids ``[L, 3]`` the batch dimension of the other's ``[B, L, 3]``."""
    if txt_ids.dim() == 2:
        txt_ids = txt_ids[None].expand(img_ids.shape[0], -1, -1)
    else:
        img_ids = img_ids[None].expand(txt_ids.shape[0], -1, -1)
    return txt_ids, img_ids


def count_parameters(args: FluxArgs) -> int:
    dim, mlp = args.hidden_size, args.mlp_hidden_dim

    def linear(n_in: int, n_out: int, bias: bool = True) -> int:
        return n_in * n_out + (n_out if bias else 0)

    embedders = (linear(args.in_channels, dim) + 2 * (linear(256, dim) + linear(dim, dim))
                 + linear(args.vec_in_dim, dim) + linear(dim, dim) + linear(args.context_in_dim, dim))
    if not args.guidance_embed:
        embedders -= linear(256, dim) + linear(dim, dim)
    per_stream = (linear(dim, 6 * dim) + linear(dim, 3 * dim, args.qkv_bias) + 2 * args.head_dim + linear(dim, dim)
                  + linear(dim, mlp) + linear(mlp, dim))
    single = linear(dim, 3 * dim + mlp) + linear(dim + mlp, dim) + 2 * args.head_dim + linear(dim, 3 * dim)
    final = linear(dim, args.out_channels) + linear(dim, 2 * dim)
    return embedders + args.depth * 2 * per_stream + args.depth_single_blocks * single + final
