"""Checkpoint interop: diffusers' ``FluxTransformer2DModel`` folders and Black Forest Labs
single files.

plait keeps the blocks in one ``blocks`` dict (double-stream ``0 .. depth-1``, then the
single-stream ones); both reference layouts number the two kinds apart. Inside a block
plait's names are BFL's, except that plait keeps apart what BFL fuses: q, k and v
(``qkv``, ``linear1`` with the MLP input) and the single-stream attention and MLP
outputs (``linear2``, fused in diffusers' ``proj_out`` too). Diffusers splits q, k, v and
the MLP input like plait, and stores the final modulation as (scale, shift) where BFL
has (shift, scale).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from plait.errors import CheckpointError, ConfigError
from plait.hf_mapping import HFMapping, MappedHFAdapter, Transform, _Read, full_tensor

from plait_flux.model import FluxArgs

DIFFUSERS_CLASS = "FluxTransformer2DModel"


@dataclass(frozen=True)
class SwappedHalves:
    """The two halves of dim 0 in the other order: (shift, scale) <-> (scale, shift)."""

    def to_plait(self, tensor: torch.Tensor, args: Any) -> torch.Tensor:
        first, second = tensor.chunk(2, dim=0)
        return torch.cat((second, first))

    def to_hf(self, tensor: torch.Tensor, args: Any) -> torch.Tensor:
        return self.to_plait(tensor, args)


#: which blocks an entry covers: (plait block index, checkpoint block index) pairs
Blocks = Callable[[FluxArgs], list[tuple[int, int]]]


def double_blocks(args: FluxArgs) -> list[tuple[int, int]]:
    return [(i, i) for i in range(args.depth)]


def single_blocks(args: FluxArgs) -> list[tuple[int, int]]:
    return [(args.depth + i, i) for i in range(args.depth_single_blocks)]


@dataclass(frozen=True)
class FluxTensor:
    """plait tensors <-> checkpoint tensors: one to one, or several on one side that are
    one fused tensor on the other, concatenated along ``dim`` (``sizes(args)``: the parts'
    lengths along it). ``{block}`` in ``ours`` and ``{layer}`` in ``theirs`` are filled
    from ``blocks``; ``when(args)`` false skips the entry."""

    ours: str | tuple[str, ...]
    theirs: str | tuple[str, ...]
    blocks: Blocks | None = None
    sizes: Callable[[FluxArgs], list[int]] | None = None
    dim: int = 0
    transform: Transform | None = None
    when: Callable[[FluxArgs], bool] | None = None

    def pairs(self, args: FluxArgs) -> list[tuple[list[str], list[str]]]:
        if self.when is not None and not self.when(args):
            return []
        ours = (self.ours,) if isinstance(self.ours, str) else self.ours
        theirs = (self.theirs,) if isinstance(self.theirs, str) else self.theirs
        indices = [(None, None)] if self.blocks is None else self.blocks(args)
        return [([name.format(block=block) for name in ours], [name.format(layer=layer) for name in theirs])
                for block, layer in indices]

    def plait_keys(self, args: FluxArgs) -> list[str]:
        return [name for ours, _ in self.pairs(args) for name in ours]

    def _fuse(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(tensors, dim=self.dim) if len(tensors) > 1 else tensors[0]

    def _split(self, tensor: torch.Tensor, names: list[str], args: FluxArgs) -> dict[str, torch.Tensor]:
        parts = tensor.split(self.sizes(args), dim=self.dim) if len(names) > 1 else (tensor,)
        return {name: part.contiguous() for name, part in zip(names, parts, strict=True)}

    def read(self, hf: Mapping[str, torch.Tensor], args: FluxArgs, out: _Read) -> None:
        for ours, theirs in self.pairs(args):
            out.used.update(theirs)
            absent = [name for name in theirs if name not in hf]
            if absent:
                out.missing.extend(absent)
                continue
            tensor = self._fuse([hf[name] for name in theirs])
            if self.transform is not None:
                tensor = self.transform.to_plait(tensor, args)
            out.state_dict.update(self._split(tensor, ours, args))

    def write(self, state_dict: Mapping[str, torch.Tensor], args: FluxArgs) -> dict[str, torch.Tensor]:
        out = {}
        for ours, theirs in self.pairs(args):
            tensor = self._fuse([full_tensor(state_dict[name]) for name in ours])
            if self.transform is not None:
                tensor = self.transform.to_hf(tensor, args)
            out.update(self._split(tensor, theirs, args))
        return out


def _linear(ours: str | tuple[str, ...], theirs: str | tuple[str, ...], **options: Any) -> list[FluxTensor]:
    """The weight and the bias of a linear layer (several on one side: a fused projection)."""
    def names(side: str | tuple[str, ...], p: str) -> tuple[str, ...]:
        return tuple(f"{name}.{p}" for name in ((side,) if isinstance(side, str) else side))

    return [FluxTensor(names(ours, p), names(theirs, p), **options) for p in ("weight", "bias")]


def _has_guidance(args: FluxArgs) -> bool:
    return args.guidance_embed


def _qkv(args: FluxArgs) -> list[int]:
    return [args.hidden_size] * 3


def _qkv_mlp(args: FluxArgs) -> list[int]:
    return [args.hidden_size] * 3 + [args.mlp_hidden_dim]


def _attn_mlp(args: FluxArgs) -> list[int]:
    return [args.hidden_size, args.mlp_hidden_dim]


def _projections(prefix: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{x}_proj" for x in "qkv")


#: the single-stream block's output: plait's attention and MLP outputs, one fused linear
#: (input features: attention, then MLP) in both reference layouts, whose one bias is attn_out's
def _single_output(theirs: str, **options: Any) -> list[FluxTensor]:
    return [
        FluxTensor(("blocks.{block}.attn_out.weight", "blocks.{block}.mlp_out.weight"), theirs + ".weight",
                   sizes=_attn_mlp, dim=1, **options),
        FluxTensor("blocks.{block}.attn_out.bias", theirs + ".bias", **options),
    ]


# --------------------------------------------------------------------------- diffusers

_D = "transformer_blocks.{layer}."
_S = "single_transformer_blocks.{layer}."
_DOUBLE = dict(blocks=double_blocks)
_SINGLE = dict(blocks=single_blocks)

DIFFUSERS_ENTRIES: list[FluxTensor] = [
    *_linear("img_in", "x_embedder"),
    *_linear("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    *_linear("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    *_linear("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1", when=_has_guidance),
    *_linear("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2", when=_has_guidance),
    *_linear("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    *_linear("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    *_linear("txt_in", "context_embedder"),
    # double-stream blocks
    *_linear("blocks.{block}.img_mod.lin", _D + "norm1.linear", **_DOUBLE),
    *_linear("blocks.{block}.txt_mod.lin", _D + "norm1_context.linear", **_DOUBLE),
    *(entry for x in "qkv" for entry in _linear(f"blocks.{{block}}.img_attn.{x}_proj", _D + f"attn.to_{x}", **_DOUBLE)),
    *(entry for x in "qkv" for entry in _linear(f"blocks.{{block}}.txt_attn.{x}_proj", _D + f"attn.add_{x}_proj",
                                                **_DOUBLE)),
    FluxTensor("blocks.{block}.img_attn.norm.query_norm.scale", (_D + "attn.norm_q.weight",), **_DOUBLE),
    FluxTensor("blocks.{block}.img_attn.norm.key_norm.scale", (_D + "attn.norm_k.weight",), **_DOUBLE),
    FluxTensor("blocks.{block}.txt_attn.norm.query_norm.scale", (_D + "attn.norm_added_q.weight",), **_DOUBLE),
    FluxTensor("blocks.{block}.txt_attn.norm.key_norm.scale", (_D + "attn.norm_added_k.weight",), **_DOUBLE),
    *_linear("blocks.{block}.img_attn.proj", _D + "attn.to_out.0", **_DOUBLE),
    *_linear("blocks.{block}.txt_attn.proj", _D + "attn.to_add_out", **_DOUBLE),
    *_linear("blocks.{block}.img_mlp.0", _D + "ff.net.0.proj", **_DOUBLE),
    *_linear("blocks.{block}.img_mlp.2", _D + "ff.net.2", **_DOUBLE),
    *_linear("blocks.{block}.txt_mlp.0", _D + "ff_context.net.0.proj", **_DOUBLE),
    *_linear("blocks.{block}.txt_mlp.2", _D + "ff_context.net.2", **_DOUBLE),
    # single-stream blocks
    *_linear("blocks.{block}.modulation.lin", _S + "norm.linear", **_SINGLE),
    *(entry for x in "qkv" for entry in _linear(f"blocks.{{block}}.{x}_proj", _S + f"attn.to_{x}", **_SINGLE)),
    *_linear("blocks.{block}.mlp_in", _S + "proj_mlp", **_SINGLE),
    FluxTensor("blocks.{block}.norm.query_norm.scale", (_S + "attn.norm_q.weight",), **_SINGLE),
    FluxTensor("blocks.{block}.norm.key_norm.scale", (_S + "attn.norm_k.weight",), **_SINGLE),
    *_single_output(_S + "proj_out", **_SINGLE),
    # output
    *_linear("final_layer.adaLN_modulation.1", "norm_out.linear", transform=SwappedHalves()),
    *_linear("final_layer.linear", "proj_out"),
]


class FluxDiffusersAdapter(MappedHFAdapter):
    """A diffusers ``FluxTransformer2DModel`` folder (``config.json`` and
    ``diffusion_pytorch_model*.safetensors``)."""

    hf_architectures = (DIFFUSERS_CLASS,)
    hf_weights_name = "diffusion_pytorch_model"
    mapping = HFMapping(model="flux", entries=DIFFUSERS_ENTRIES, tied=None)

    @property
    def file_formats(self) -> dict[str, Callable[[Mapping[str, torch.Tensor], FluxArgs], dict[str, torch.Tensor]]]:
        """``plait convert --format bfl``: a Black Forest Labs single file."""
        return {"bfl": bfl_tensors}

    def args_from_hf_config(self, hf_config: dict[str, Any]) -> FluxArgs:
        class_name = hf_config.get("_class_name", DIFFUSERS_CLASS)
        if class_name != DIFFUSERS_CLASS:
            raise ConfigError(f"the folder holds a diffusers {class_name}; flux reads a {DIFFUSERS_CLASS} "
                              "(the transformer/ subfolder of a FLUX.1 pipeline)")
        if hf_config.get("patch_size", 1) != 1:
            raise ConfigError(f"flux reads patch_size 1 (latents are packed 2×2 before the model), "
                              f"got {hf_config['patch_size']}")
        missing = [k for k in ("num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
                               "joint_attention_dim", "pooled_projection_dim") if k not in hf_config]
        if missing:
            raise ConfigError(f"flux: config.json lacks {', '.join(missing)}")
        heads, head_dim = hf_config["num_attention_heads"], hf_config["attention_head_dim"]
        in_channels = hf_config.get("in_channels", 64)
        return FluxArgs(
            in_channels=in_channels,
            out_channels=hf_config.get("out_channels") or in_channels,
            vec_in_dim=hf_config["pooled_projection_dim"],
            context_in_dim=hf_config["joint_attention_dim"],
            hidden_size=heads * head_dim,
            num_heads=heads,
            depth=hf_config["num_layers"],
            depth_single_blocks=hf_config["num_single_layers"],
            axes_dim=tuple(hf_config.get("axes_dims_rope", (16, 56, 56))),
            guidance_embed=bool(hf_config.get("guidance_embeds", False)),
        )

    def hf_config_from_args(self, args: FluxArgs) -> dict[str, Any]:
        if args.mlp_ratio != 4.0 or args.theta != 10_000 or not args.qkv_bias:
            raise ConfigError("diffusers' FluxTransformer2DModel fixes mlp_ratio 4, RoPE theta 10000 and qkv "
                              f"biases; these args have mlp_ratio {args.mlp_ratio}, theta {args.theta}, "
                              f"qkv_bias {args.qkv_bias}")
        return {
            "_class_name": DIFFUSERS_CLASS,
            "patch_size": 1,
            "in_channels": args.in_channels,
            "out_channels": args.out_channels,
            "num_layers": args.depth,
            "num_single_layers": args.depth_single_blocks,
            "attention_head_dim": args.head_dim,
            "num_attention_heads": args.num_heads,
            "joint_attention_dim": args.context_in_dim,
            "pooled_projection_dim": args.vec_in_dim,
            "guidance_embeds": args.guidance_embed,
            "axes_dims_rope": list(args.axes_dim),
        }


# --------------------------------------------------------------------------- Black Forest Labs


_DB = "double_blocks.{layer}."
_SB = "single_blocks.{layer}."

#: the projections BFL fuses; every other tensor has plait's name, renumbered
BFL_FUSED: list[FluxTensor] = [
    *_linear(_projections("blocks.{block}.img_attn."), _DB + "img_attn.qkv", sizes=_qkv, **_DOUBLE),
    *_linear(_projections("blocks.{block}.txt_attn."), _DB + "txt_attn.qkv", sizes=_qkv, **_DOUBLE),
    *_linear((*_projections("blocks.{block}."), "blocks.{block}.mlp_in"), _SB + "linear1", sizes=_qkv_mlp,
             **_SINGLE),
    *_single_output(_SB + "linear2", **_SINGLE),
]


def _bfl_renames(args: FluxArgs, plait_keys: list[str]) -> list[FluxTensor]:
    """plait's names with ``blocks.N.`` as ``double_blocks.N.`` / ``single_blocks.(N - depth).``."""
    entries = []
    for key in plait_keys:
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            block = int(index)
            theirs = f"double_blocks.{block}.{rest}" if block < args.depth else \
                f"single_blocks.{block - args.depth}.{rest}"
            entries.append(FluxTensor(key, theirs))
        else:
            entries.append(FluxTensor(key, key))
    return entries


def bfl_mapping(args: FluxArgs) -> HFMapping:
    fused = {key for entry in BFL_FUSED for key in entry.plait_keys(args)}
    renamed = [key for key in FluxDiffusersAdapter.mapping.plait_keys(args) if key not in fused]
    return HFMapping(model="flux (BFL single file)", entries=[*BFL_FUSED, *_bfl_renames(args, renamed)], tied=None)


def load_bfl_file(path: str | Path, args: FluxArgs) -> dict[str, torch.Tensor]:
    """The plait state dict of a BFL single-file checkpoint (``flux1-dev.safetensors``) of
    the shape ``args`` (the file has no config: give the flavor's args)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"BFL checkpoint {path} does not exist; expected a single .safetensors file "
                          "such as flux1-dev.safetensors")
    try:
        tensors = load_file(path)
    except Exception as error:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read {path}: {error}") from error
    return bfl_mapping(args).from_hf(tensors, args)


def bfl_tensors(state_dict: Mapping[str, torch.Tensor], args: FluxArgs) -> dict[str, torch.Tensor]:
    """A plait state dict in the BFL single file's names and fused layout."""
    return bfl_mapping(args).to_hf(state_dict, args)


def save_bfl_file(state_dict: Mapping[str, torch.Tensor], args: FluxArgs, path: str | Path) -> None:
    """Write a plait state dict as a BFL single-file checkpoint."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().cpu().contiguous() for name, t in bfl_tensors(state_dict, args).items()}
    save_file(tensors, Path(path), metadata={"format": "pt"})

