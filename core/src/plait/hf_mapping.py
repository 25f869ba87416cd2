"""Hugging Face state-dict conversion driven by a table.

A model package describes how its tensors map to a Hugging Face checkpoint as a list of
entries, and ``HFMapping`` does the loops, the layer indices, the tied embedding and the
one report of missing and unexpected keys, in both directions::

    MAPPING = HFMapping(
        model="mymodel",
        entries=[
            *renames({"tok_embeddings.weight": "model.embed_tokens.weight", ...}),
            *layer_renames({"attention.wq.weight": "self_attn.q_proj.weight", ...}),
            *layer_renames({"feed_forward.w1.weight": "mlp.gate_proj.weight"}, layers=dense_layers),
            StackedExperts(layers=moe_layers),
        ],
        prepare=(dequantize_fp8_blockwise,),
    )

Entries: ``Rename`` (one tensor each side, optionally through a ``Transform`` such as
``InterleavedRopeRows``, the rotary-row permutation of Meta-layout Llama and of
DeepSeek's checkpoints), ``StackedExperts`` (3-D expert weights from per-expert or fused
HF tensors) and ``NotInHF`` (a plait tensor the HF model lacks, e.g. an expert bias).
``prepare`` steps rewrite the HF state dict before it is read (``dequantize_fp8_blockwise``,
``drop_hf_layers_from``). ``MappedHFAdapter`` is an ``HFAdapter`` whose ``from_hf`` /
``to_hf`` are its ``mapping``; the model package writes only the config conversion.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from plait.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    import torch

#: args -> the layer indices an entry applies to
LayerSelector = Callable[[Any], Iterable[int]]


def all_layers(args: Any) -> range:
    """Every block: ``range(args.n_layers)``."""
    return range(args.n_layers)


def listed(keys: Iterable[str], *, limit: int = 5) -> str:
    """The first ``limit`` keys, sorted, and how many more."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a sharded model), else the tensor itself."""
    gather = getattr(tensor, "full_tensor", None)
    return gather() if gather is not None else tensor


# --------------------------------------------------------------------------- transforms


class Transform(Protocol):
    """A change of layout between the two sides of one ``Rename``; exact inverses."""

    def to_plait(self, tensor: torch.Tensor, args: Any) -> torch.Tensor: ...

    def to_hf(self, tensor: torch.Tensor, args: Any) -> torch.Tensor: ...


@dataclass(frozen=True)
class InterleavedRopeRows:
    """Rotary rows stored interleaved on the HF side ``(x0, x1), (x2, x3), ...``, as
    halves in plait (even features first, then odd ones).

    The weight ``[out, in]`` is read as heads of ``head_dim(args)`` rows whose last
    ``rope_dim(args)`` rows are rotary. With ``rope_dim == head_dim`` this is the q/k
    permutation between Meta's Llama checkpoints and the rotate-half layout; DeepSeek
    rotates only the last ``qk_rope_head_dim`` rows of each head. Attention scores do
    not change when queries and keys are permuted alike.
    """

    head_dim: Callable[[Any], int]
    rope_dim: Callable[[Any], int]

    def _reorder(self, weight: torch.Tensor, args: Any, *, to_plait: bool) -> torch.Tensor:
        import torch

        head_dim, rope_dim = self.head_dim(args), self.rope_dim(args)
        order = torch.cat((torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)))
        if not to_plait:
            order = order.argsort()
        heads = weight.reshape(-1, head_dim, weight.shape[-1])
        plain, rope = heads.split([head_dim - rope_dim, rope_dim], dim=1)
        return torch.cat((plain, rope[:, order]), dim=1).reshape(weight.shape)

    def to_plait(self, tensor: torch.Tensor, args: Any) -> torch.Tensor:
        return self._reorder(tensor, args, to_plait=True)

    def to_hf(self, tensor: torch.Tensor, args: Any) -> torch.Tensor:
        return self._reorder(tensor, args, to_plait=False)


# --------------------------------------------------------------------------- entries


class _Read:
    """What entries read from an HF state dict: plait tensors, HF names used and missing."""

    def __init__(self) -> None:
        self.state_dict: dict[str, torch.Tensor] = {}
        self.used: set[str] = set()
        self.missing: list[str] = []


class Entry(Protocol):
    def plait_keys(self, args: Any) -> list[str]:
        """The plait state-dict keys this entry covers."""

    def read(self, hf: Mapping[str, torch.Tensor], args: Any, out: _Read) -> None:
        """Add this entry's plait tensors, used and missing HF names to ``out``."""

    def write(self, state_dict: Mapping[str, torch.Tensor], args: Any) -> dict[str, torch.Tensor]:
        """This entry's HF tensors from a plait state dict."""


def _layers_of(selector: LayerSelector | None, args: Any) -> Iterable[int | None]:
    return [None] if selector is None else selector(args)


@dataclass(frozen=True)
class Rename:
    """One plait tensor <-> one HF tensor. ``ours`` and ``theirs`` may contain ``{layer}``,
    filled from ``layers`` (None: a tensor outside the blocks); ``when(args)`` false skips
    the entry; ``transform`` changes the layout."""

    ours: str
    theirs: str
    layers: LayerSelector | None = None
    transform: Transform | None = None
    when: Callable[[Any], bool] | None = None

    def pairs(self, args: Any) -> list[tuple[str, str]]:
        if self.when is not None and not self.when(args):
            return []
        return [(self.ours.format(layer=i), self.theirs.format(layer=i)) for i in _layers_of(self.layers, args)]

    def plait_keys(self, args: Any) -> list[str]:
        return [ours for ours, _ in self.pairs(args)]

    def read(self, hf: Mapping[str, torch.Tensor], args: Any, out: _Read) -> None:
        for ours, theirs in self.pairs(args):
            out.used.add(theirs)
            if theirs not in hf:
                out.missing.append(theirs)
                continue
            tensor = hf[theirs]
            out.state_dict[ours] = tensor if self.transform is None else self.transform.to_plait(tensor, args)

    def write(self, state_dict: Mapping[str, torch.Tensor], args: Any) -> dict[str, torch.Tensor]:
        out = {}
        for ours, theirs in self.pairs(args):
            tensor = full_tensor(state_dict[ours])
            out[theirs] = tensor if self.transform is None else self.transform.to_hf(tensor, args)
        return out


def renames(table: Mapping[str, str], *, transforms: Mapping[str, Transform] | None = None,
            when: Callable[[Any], bool] | None = None) -> list[Rename]:
    """``Rename`` entries for tensors outside the blocks, plait name -> HF name."""
    transforms = transforms or {}
    return [Rename(ours, theirs, transform=transforms.get(ours), when=when) for ours, theirs in table.items()]


def layer_renames(table: Mapping[str, str], *, layers: LayerSelector = all_layers,
                  transforms: Mapping[str, Transform] | None = None, when: Callable[[Any], bool] | None = None,
                  ours_prefix: str = "layers.{layer}.", hf_prefix: str = "model.layers.{layer}.") -> list[Rename]:
    """``Rename`` entries for the tensors of every selected block, names relative to the
    block (``"attention.wq.weight": "self_attn.q_proj.weight"``)."""
    transforms = transforms or {}
    return [Rename(ours_prefix + ours, hf_prefix + theirs, layers=layers, transform=transforms.get(ours), when=when)
            for ours, theirs in table.items()]  # fmt: skip


#: The names ``plait.nn.DecoderStack`` / ``PreNormBlock`` share with HF's Llama family
#: (Llama, Qwen, DeepSeek, Mistral, ...): the ends of the stack ...
HF_DECODER_ENDS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
#: ... the block's two norms ...
HF_BLOCK_NORMS = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
#: ... and a dense SwiGLU feed-forward (``plait.nn.FeedForward``); relative to a block.
HF_FEED_FORWARD = {
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}


#: plait's stacked expert weight -> the HF per-expert projection
EXPERT_PROJECTIONS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


@dataclass(frozen=True)
class StackedExperts:
    """The routed experts of ``plait.nn.MoE``: plait stacks them (``experts.w1/w2/w3``,
    ``[expert, out, in]``); HF folders store them per expert
    (``mlp.experts.{e}.gate_proj/up_proj/down_proj.weight``, what official checkpoints and
    transformers 5 write) or fused (``mlp.experts.gate_up_proj`` ``[expert, 2 * hidden,
    dim]`` and ``mlp.experts.down_proj``). Import reads both; export writes per expert."""

    layers: LayerSelector
    num_experts: Callable[[Any], int] = lambda args: args.moe.num_experts
    ours: str = "layers.{layer}.moe.experts.{weight}"
    hf_prefix: str = "model.layers.{layer}.mlp.experts"

    def plait_keys(self, args: Any) -> list[str]:
        return [self.ours.format(layer=i, weight=w) for i in self.layers(args) for w in EXPERT_PROJECTIONS]

    def _per_expert(self, layer: int, expert: int, projection: str) -> str:
        return f"{self.hf_prefix.format(layer=layer)}.{expert}.{projection}.weight"

    def read(self, hf: Mapping[str, torch.Tensor], args: Any, out: _Read) -> None:
        import torch

        for layer in self.layers(args):
            prefix = self.hf_prefix.format(layer=layer)
            gate_up, down = f"{prefix}.gate_up_proj", f"{prefix}.down_proj"
            if gate_up in hf and down in hf:
                stacked = dict(zip(("w1", "w3"), hf[gate_up].chunk(2, dim=1)), w2=hf[down])
                out.used.update((gate_up, down))
            else:
                names = {w: [self._per_expert(layer, e, p) for e in range(self.num_experts(args))]
                         for w, p in EXPERT_PROJECTIONS.items()}  # fmt: skip
                flat = [name for group in names.values() for name in group]
                out.used.update(flat)
                absent = [name for name in flat if name not in hf]
                if absent:
                    out.missing.extend(absent)
                    continue
                stacked = {w: torch.stack([hf[name] for name in group]) for w, group in names.items()}
            for weight, tensor in stacked.items():
                out.state_dict[self.ours.format(layer=layer, weight=weight)] = tensor

    def write(self, state_dict: Mapping[str, torch.Tensor], args: Any) -> dict[str, torch.Tensor]:
        out = {}
        for layer in self.layers(args):
            for weight, projection in EXPERT_PROJECTIONS.items():
                stacked = full_tensor(state_dict[self.ours.format(layer=layer, weight=weight)])
                for expert, tensor in enumerate(stacked.unbind(0)):
                    out[self._per_expert(layer, expert, projection)] = tensor
        return out


@dataclass(frozen=True)
class NotInHF:
    """A plait tensor the HF model does not have: ``init(args)`` makes it on import;
    ``check(tensor, layer)`` may refuse to export a value HF cannot represent."""

    ours: str
    init: Callable[[Any], torch.Tensor]
    layers: LayerSelector | None = None
    check: Callable[[torch.Tensor, int | None], None] | None = None

    def plait_keys(self, args: Any) -> list[str]:
        return [self.ours.format(layer=i) for i in _layers_of(self.layers, args)]

    def read(self, hf: Mapping[str, torch.Tensor], args: Any, out: _Read) -> None:
        for key in self.plait_keys(args):
            out.state_dict[key] = self.init(args)

    def write(self, state_dict: Mapping[str, torch.Tensor], args: Any) -> dict[str, torch.Tensor]:
        if self.check is not None:
            for layer in _layers_of(self.layers, args):
                self.check(full_tensor(state_dict[self.ours.format(layer=layer)]), layer)
        return {}


# --------------------------------------------------------------------------- preparation steps

#: (hf_state_dict, args) -> hf_state_dict, run in order before the entries read it
PrepareStep = Callable[[dict[str, "torch.Tensor"], Any], dict[str, "torch.Tensor"]]

FP8_BLOCK_SIZE = (128, 128)
FP8_SCALE_SUFFIX = ".weight_scale_inv"


def drop_hf_layers_from(first: Callable[[Any], int]) -> PrepareStep:
    """A step that drops the HF blocks from index ``first(args)`` on (e.g. DeepSeek-V3's
    multi-token-prediction layer, stored after the last block)."""

    def drop(hf: dict[str, torch.Tensor], args: Any) -> dict[str, torch.Tensor]:
        prefix = f"model.layers.{first(args)}."
        return {key: value for key, value in hf.items() if not key.startswith(prefix)}

    return drop


def dequantize_blockwise(
    weight: torch.Tensor, scale_inv: torch.Tensor, *, name: str, block_size: tuple[int, int] = FP8_BLOCK_SIZE
) -> torch.Tensor:
    """The float32 weight of an fp8 ``weight`` ``[out, in]`` and its block scales: one
    float32 scale per ``block_size`` block, ``W = fp8.float() * scale_inv`` with each
    scale spread over its block (the last blocks of a row or column may be partial)."""
    if weight.dim() != 2:
        raise CheckpointError(f"{name}: block-wise fp8 weights must be 2-D, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    block_rows, block_cols = block_size
    expected = (math.ceil(rows / block_rows), math.ceil(cols / block_cols))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(
            f"{name}: weight_scale_inv has shape {tuple(scale_inv.shape)}, but a {rows}x{cols} weight in "
            f"{block_rows}x{block_cols} blocks needs {expected}"
        )
    scales = scale_inv.float().repeat_interleave(block_rows, dim=0)[:rows]
    scales = scales.repeat_interleave(block_cols, dim=1)[:, :cols]
    return weight.float() * scales


def _is_fp8(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() and tensor.element_size() == 1


def dequantize_fp8_blockwise(hf: dict[str, torch.Tensor], args: Any = None) -> dict[str, torch.Tensor]:
    """A step: every fp8 ``<name>.weight`` stored with a ``<name>.weight_scale_inv`` (the
    block-wise fp8 of DeepSeek-V3's and Qwen3's FP8 releases) becomes float32; the scales
    are consumed; other tensors pass unchanged."""
    scales = {key.removesuffix(FP8_SCALE_SUFFIX): key for key in hf if key.endswith(FP8_SCALE_SUFFIX)}
    orphans = [key for prefix, key in scales.items() if f"{prefix}.weight" not in hf]
    if orphans:
        raise CheckpointError(f"the HF checkpoint has scales without their fp8 weight: {listed(orphans)}")
    unscaled = [key for key, tensor in hf.items() if _is_fp8(tensor) and key.removesuffix(".weight") not in scales]
    if unscaled:
        raise CheckpointError(
            f"the HF checkpoint has fp8 tensors without a {FP8_SCALE_SUFFIX.lstrip('.')}: {listed(unscaled)}"
        )
    out: dict[str, torch.Tensor] = {}
    for key, tensor in hf.items():
        if key.endswith(FP8_SCALE_SUFFIX):
            continue
        prefix = key.removesuffix(".weight")
        if key.endswith(".weight") and prefix in scales:
            tensor = dequantize_blockwise(tensor, hf[scales[prefix]], name=key)
        out[key] = tensor
    return out


# --------------------------------------------------------------------------- the mapping


@dataclass(frozen=True)
class TiedEmbeddings:
    """When ``args.tie_word_embeddings``: the HF checkpoint stores only the embedding
    (some also keep ``hf_head``); plait holds both names on one tensor."""

    head: str = "output.weight"
    embedding: str = "tok_embeddings.weight"
    hf_head: str = "lm_head.weight"


@dataclass(frozen=True)
class HFMapping:
    """Converts state dicts both ways from ``entries``; ``model`` names the model in errors."""

    model: str
    entries: Sequence[Entry]
    prepare: Sequence[PrepareStep] = ()
    tied: TiedEmbeddings | None = field(default_factory=TiedEmbeddings)
    #: HF tensors that carry no weights (older checkpoints saved the RoPE frequencies)
    ignored_hf_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)

    def _is_tied(self, args: Any) -> bool:
        return self.tied is not None and bool(getattr(args, "tie_word_embeddings", False))

    def _entries(self, args: Any) -> list[Entry]:
        if not self._is_tied(args):
            return list(self.entries)
        # the head is the embedding: drop the entry that would read or write it on its own
        return [e for e in self.entries if not (isinstance(e, Rename) and e.ours == self.tied.head)]

    def plait_keys(self, args: Any) -> list[str]:
        """Every plait state-dict key the model args imply."""
        keys = [key for entry in self._entries(args) for key in entry.plait_keys(args)]
        return keys + [self.tied.head] if self._is_tied(args) else keys

    def from_hf(self, hf_state_dict: Mapping[str, torch.Tensor], args: Any) -> dict[str, torch.Tensor]:
        hf = dict(hf_state_dict)
        for step in self.prepare:
            hf = step(hf, args)
        read = _Read()
        for entry in self._entries(args):
            entry.read(hf, args, read)
        if read.missing:
            raise CheckpointError(
                f"{self.model}: the HF checkpoint lacks {len(read.missing)} tensor(s) its config.json implies: "
                f"{listed(read.missing)}"
            )
        if self._is_tied(args):
            read.used.add(self.tied.hf_head)  # some tied checkpoints store the copy anyway
            read.state_dict[self.tied.head] = read.state_dict[self.tied.embedding]
        unexpected = [k for k in hf if k not in read.used and not k.endswith(self.ignored_hf_suffixes)]
        if unexpected:
            raise CheckpointError(
                f"{self.model}: the HF checkpoint has {len(unexpected)} tensor(s) this model does not use: "
                f"{listed(unexpected)}; is config.json from the same model?"
            )
        return read.state_dict

    def to_hf(self, state_dict: Mapping[str, torch.Tensor], args: Any) -> dict[str, torch.Tensor]:
        expected = self.plait_keys(args)
        expected_set = set(expected)
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected_set]
        if missing or unexpected:
            raise CheckpointError(
                f"{self.model}: the state dict does not match the model args"
                + (f"; missing: {listed(missing)}" if missing else "")
                + (f"; unexpected: {listed(unexpected)}" if unexpected else "")
            )
        hf: dict[str, torch.Tensor] = {}
        for entry in self._entries(args):
            hf.update(entry.write(state_dict, args))
        return hf


# --------------------------------------------------------------------------- adapters and configs


class MappedHFAdapter:
    """An ``HFAdapter`` whose state-dict conversion is ``self.mapping``; a subclass sets
    ``hf_architectures`` and ``mapping`` and writes ``args_from_hf_config`` and
    ``hf_config_from_args``."""

    hf_architectures: tuple[str, ...] = ()
    mapping: HFMapping

    def from_hf(self, hf_state_dict: dict[str, torch.Tensor], args: Any) -> dict[str, torch.Tensor]:
        return self.mapping.from_hf(hf_state_dict, args)

    def to_hf(self, state_dict: dict[str, torch.Tensor], args: Any) -> dict[str, torch.Tensor]:
        return self.mapping.to_hf(state_dict, args)


def require_hf_keys(model: str, hf_config: Mapping[str, Any], keys: Iterable[str], *, what: str = "config.json") -> None:
    """A ``ConfigError`` naming every key of ``keys`` that ``hf_config`` lacks."""
    missing = [key for key in keys if key not in hf_config]
    if missing:
        raise ConfigError(f"{model}: {what} lacks {', '.join(missing)}")


@dataclass(frozen=True)
class HFRope:
    """The RoPE settings of an HF ``config.json``: ``rope_type``, ``theta`` and the other
    parameters (``factor``, ...)."""

    rope_type: str
    theta: float
    params: Mapping[str, Any]


def hf_rope(hf_config: Mapping[str, Any], *, default_theta: float = 10000.0) -> HFRope:
    """RoPE settings from ``rope_parameters`` (transformers 5, theta inside) or from
    ``rope_theta`` next to an optional ``rope_scaling`` (older versions)."""
    params = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf_config.get("rope_theta", default_theta))
    return HFRope(rope_type=params.get("rope_type", params.get("type", "default")), theta=float(theta), params=params)
