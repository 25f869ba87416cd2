"""Putting a model chunk's attention kernels under context parallelism.

Each module named by the model spec's ``cp_attention_modules`` gets torch's
context-parallel style: the local q, k, v shards it receives become DTensors sharded on
the sequence dim of the cp mesh, so the attention op inside runs as ring attention
(SDPA) or on all-gathered keys and values (flex attention), and its output leaves as
the local shard again. Nothing happens until a micro-batch enables torch's
context-parallel dispatcher (``context_parallel_attention_enabled``).

Flex attention takes its mask as a ``BlockMask`` over the whole sequence; under context
parallelism a rank's queries are its head-tail shard and the gathered keys and values
come rank after rank, so ``local_block_mask`` rebuilds the mask for exactly those positions.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Literal

import torch
from plait.model_spec import module_path_matches
from torch import nn

from plait_context_parallel.load_balance import SequenceShard, head_tail_order

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.nn.attention.flex_attention import BlockMask

#: q, k, v are [batch, heads, seq, head_dim].
QKV_SEQ_DIM = 2


pattern_matches = module_path_matches


def attention_module_paths(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    patterns = tuple(patterns)
    return [
        name for name, _ in model.named_modules() if name and any(pattern_matches(p, name) for p in patterns)
    ]


def wrap_attention_modules(
    model: nn.Module, cp_mesh: DeviceMesh, paths: list[str], attention: Literal["sdpa", "flex"]
) -> None:
    from torch.distributed.tensor.experimental._attention import _ContextParallel
    from torch.distributed.tensor.parallel import parallelize_module

    kind = _ContextParallel.AttentionType.SDPA if attention == "sdpa" else _ContextParallel.AttentionType.FLEX
    style = _ContextParallel(seq_dim=QKV_SEQ_DIM, attention_type=kind)
    for path in paths:
        parallelize_module(model.get_submodule(path), cp_mesh, style)


def set_rotate_method(rotate_method: str) -> None:
    from torch.distributed.tensor.experimental._attention import set_rotate_method as torch_set_rotate_method

    torch_set_rotate_method(rotate_method)


@contextlib.contextmanager
def context_parallel_attention_enabled(*, causal: bool = True) -> Iterator[None]:
    """Route the wrapped attention modules' ops to context-parallel attention (ring attention
    for SDPA), for shards laid out head-tail (see ``load_balance``). ``causal`` False: the
    attention is unmasked, so which positions a rank holds does not matter to it (torch's
    ring attention refuses load balancing there)."""
    from torch.distributed.tensor.experimental._attention import (
        _cp_options,
        _disable_context_parallel_dispatcher,
        _enable_context_parallel_dispatcher,
    )

    load_balanced = _cp_options.enable_load_balance
    _cp_options.enable_load_balance = causal
    _enable_context_parallel_dispatcher()
    try:
        yield
    finally:
        _disable_context_parallel_dispatcher()
        _cp_options.enable_load_balance = load_balanced


#: mask -> {(seq_len, cp_degree, cp_rank): local mask}; a model usually keeps one mask.
_local_masks: weakref.WeakKeyDictionary[BlockMask, dict[tuple[int, int, int], BlockMask]] = (
    weakref.WeakKeyDictionary()
)


def local_block_mask(mask: BlockMask, shard: SequenceShard) -> BlockMask:
    """``mask`` (over the whole sequence) for this rank's queries against the keys and values
    of all ranks, which flex attention receives gathered in rank order. Cached per mask."""
    key = (shard.seq_len, shard.cp_degree, shard.cp_rank)
    cached = _local_masks.setdefault(mask, {})
    if key not in cached:
        cached[key] = _build_local_block_mask(mask, shard)
    return cached[key]


def _build_local_block_mask(mask: BlockMask, shard: SequenceShard) -> BlockMask:
    from torch.nn.attention.flex_attention import create_block_mask

    device = mask.kv_num_blocks.device
    query_positions = shard.positions.to(device)
    kv_positions = head_tail_order(shard.seq_len, cp_degree=shard.cp_degree, device=device)
    global_mask_mod = mask.mask_mod

    def local_mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return global_mask_mod(b, h, query_positions[q_idx], kv_positions[kv_idx])

    batch, heads = mask.kv_num_blocks.shape[:2]
    return create_block_mask(
        local_mask_mod, batch, heads, len(query_positions), len(kv_positions),
        device=device, BLOCK_SIZE=mask.BLOCK_SIZE,
    )  # fmt: skip
