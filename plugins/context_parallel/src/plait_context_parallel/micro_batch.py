"""What one micro-batch looks like under context parallelism.

``prepare_chunk`` runs once per model chunk (``plait_apply_context_parallel``): it wraps the
attention modules and finds the chunk's sequence buffers (the RoPE table). For each
micro-batch, ``context_parallel_micro_batch`` then gives this rank its head-tail share of
the sequence: the inputs and labels of the step context and the rows of every sequence
buffer are replaced by this rank's positions (a flex ``BlockMask`` is rebuilt for them),
and attention runs as context-parallel attention over the cp ranks. Everything is put
back when the micro-batch ends.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from plait.data.batch import TensorBatch
from plait.errors import ConfigError, PlaitError
from plait_context_parallel.attention import (
    attention_module_paths,
    context_parallel_attention_enabled,
    local_block_mask,
    wrap_attention_modules,
)
from plait_context_parallel.load_balance import SequenceShard

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.nn.attention.flex_attention import BlockMask

    from plait.model_spec import ModelSpec
    from plait.train_state import StepContext

#: inputs and labels are [batch, seq].
BATCH_SEQ_DIM = 1


@dataclass(frozen=True)
class SequenceBuffer:
    """A registered buffer indexed by position (``seq_dim``), or a flex ``BlockMask`` attribute."""

    owner: nn.Module
    name: str
    seq_dim: int

    def local_view(self, shard: SequenceShard) -> torch.Tensor | BlockMask:
        from torch.nn.attention.flex_attention import BlockMask

        value = getattr(self.owner, self.name)
        if isinstance(value, BlockMask):
            return local_block_mask(value, shard)
        if isinstance(value, torch.Tensor):
            return shard.take(value, dim=self.seq_dim)
        raise PlaitError(
            f"sequence buffer {self.name!r} holds {type(value).__name__}, not a tensor or a flex BlockMask"
        )


@dataclass(frozen=True)
class PreparedChunk:
    attention_paths: tuple[str, ...]
    sequence_buffers: tuple[SequenceBuffer, ...]
    sequence_inputs: Mapping[str, int]
    """Named inputs indexed by position (name -> sequence dim), for a model with its own data pipeline."""


_prepared: weakref.WeakKeyDictionary[nn.Module, PreparedChunk] = weakref.WeakKeyDictionary()


def _has_blocks(model: nn.Module, container: str) -> bool:
    blocks = getattr(model, container, None)
    return isinstance(blocks, nn.Module) and len(list(blocks.children())) > 0


def _sequence_buffers(model: nn.Module, buffers: Mapping[str, int], spec_name: str) -> tuple[SequenceBuffer, ...]:
    from torch.nn.attention.flex_attention import BlockMask

    found = []
    for path, seq_dim in buffers.items():
        owner_path, _, name = path.rpartition(".")
        try:
            owner = model.get_submodule(owner_path)
        except AttributeError:
            owner = None
        is_buffer = owner is not None and isinstance(owner._buffers.get(name), torch.Tensor)
        if not (is_buffer or isinstance(getattr(owner, name, None), BlockMask)):
            raise ConfigError(
                f"model {spec_name!r}: its spec names {path!r} in cp_sequence_buffers, but this model "
                "chunk has no such registered buffer or flex BlockMask attribute; fix the spec"
            )
        found.append(SequenceBuffer(owner=owner, name=name, seq_dim=seq_dim))
    return tuple(found)


def prepare_chunk(model: nn.Module, cp_mesh: DeviceMesh, model_spec: ModelSpec) -> PreparedChunk:
    """Wrap the chunk's attention modules and remember its sequence buffers."""
    attention = model_spec.cp_attention
    if attention is None:
        raise ConfigError(f"model {model_spec.name!r} does not support context parallelism (cp_attention is None)")
    paths = attention_module_paths(model, model_spec.cp_attention_modules)
    if not paths and _has_blocks(model, model_spec.block_container):
        raise ConfigError(
            f"model {model_spec.name!r}: cp_attention_modules {list(model_spec.cp_attention_modules)} match "
            "no module of this model chunk; fix the patterns in its spec (e.g. 'layers.*.attention.sdpa')"
        )
    buffers = _sequence_buffers(model, model_spec.cp_sequence_buffers, model_spec.name) if paths else ()
    wrap_attention_modules(model, cp_mesh, paths, attention)
    prepared = PreparedChunk(attention_paths=tuple(paths), sequence_buffers=buffers,
                             sequence_inputs=dict(model_spec.cp_sequence_inputs))
    _prepared[model] = prepared
    return prepared


def prepared_chunk(model: nn.Module) -> PreparedChunk:
    prepared = _prepared.get(model)
    if prepared is None:
        raise PlaitError(
            "a model chunk reached a context-parallel step without plait_apply_context_parallel: "
            "every chunk must go through the core's per-chunk hooks before training"
        )
    return prepared


@contextlib.contextmanager
def context_parallel_micro_batch(ctx: StepContext, cp_mesh: DeviceMesh) -> Iterator[None]:
    """Shard the micro-batch in ``ctx`` and the chunks' sequence buffers for this cp rank,
    with ring attention enabled; restore everything on exit."""
    if ctx.inputs is None:
        raise PlaitError("context parallelism needs the micro-batch's inputs in the step context")
    cp_degree, cp_rank = cp_mesh.size(), cp_mesh.get_local_rank()

    def shard_of(seq_len: int, what: str, fix: str) -> SequenceShard:
        if seq_len % (2 * cp_degree):
            raise ConfigError(
                f"a micro-batch of {what} {seq_len} cannot be split into 2 × cp = {2 * cp_degree} "
                f"equal chunks; {fix}"
            )
        return SequenceShard.head_tail(seq_len, cp_degree=cp_degree, cp_rank=cp_rank, device=ctx.inputs.device)

    def take(tensor: torch.Tensor, dim: int, what: str) -> torch.Tensor:
        fix = "choose the model's sizes (image size, caption tokens) so that it is a multiple of it"
        return shard_of(tensor.shape[dim], what, fix).take(tensor, dim=dim)

    full_inputs, full_labels = ctx.inputs, ctx.labels
    parts = [prepared_chunk(part) for part in ctx.model_parts]
    buffers = [buffer for part in parts for buffer in part.sequence_buffers]
    originals = [getattr(buffer.owner, buffer.name) for buffer in buffers]
    shard = None if isinstance(full_inputs, TensorBatch) else shard_of(
        full_inputs.shape[BATCH_SEQ_DIM], "sequence length", "use a --training.seq_len that is a multiple of it")
    try:
        if isinstance(full_inputs, TensorBatch):
            sequence_inputs = parts[0].sequence_inputs
            ctx.inputs = TensorBatch({
                name: take(tensor, sequence_inputs[name], f"input {name!r} of length")
                if name in sequence_inputs else tensor
                for name, tensor in full_inputs.items()
            })
        else:
            ctx.inputs = shard.take(full_inputs, dim=BATCH_SEQ_DIM)
        if full_labels is not None:
            ctx.labels = shard.take(full_labels, dim=BATCH_SEQ_DIM) if shard is not None else take(
                full_labels, BATCH_SEQ_DIM, "labels of length")
        for buffer in buffers:
            setattr(buffer.owner, buffer.name, buffer.local_view(shard))
        with context_parallel_attention_enabled(causal=shard is not None):  # named inputs: unmasked
            yield
    finally:
        for buffer, original in zip(buffers, originals):
            setattr(buffer.owner, buffer.name, original)
        ctx.inputs, ctx.labels = full_inputs, full_labels
