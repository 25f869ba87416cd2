"""The core's own per-chunk transforms: activation checkpointing and torch.compile.

They run between the plugins' context-parallel and data-parallel hooks (the hook order in docs/plugins.md),
block by block over ``model.<block_container>``.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, _CachedTorchDispatchMode, _CachingTorchDispatchMode

from plait.config import ActivationCheckpointSection, CompileSection

#: Ops whose outputs selective AC keeps (expensive to recompute); everything else is recomputed.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._grouped_mm.default,  # MoE experts
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def blocks_of(model: nn.Module, container: str) -> nn.Module | None:
    return getattr(model, container, None)


def _policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


class _ReplaySavedOps(_CachedTorchDispatchMode):
    """The recompute side of selective checkpointing, strict only about the saved ops.

    torch's replays every operator by its position in the forward and fails when the
    recompute calls one more often. Hooks inside a block may legitimately do so: an
    FSDP unit inside the block (the experts under expert parallelism) gathers its
    parameters again in the recompute. Operators that are recomputed anyway simply run;
    the saved ones (matmuls, attention) are still taken from the forward, by position.
    Built on torch 2.13's private SAC modes (``torch.utils.checkpoint``); the ep and core
    activation-checkpointing tests exercise it, so a torch upgrade that changes them fails there.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in _SAVE_OPS:
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


def _selective_op_context():
    storage: defaultdict = defaultdict(dict)  # what create_selective_checkpoint_contexts builds
    return _CachingTorchDispatchMode(_policy, storage), _ReplaySavedOps(_policy, storage)


def apply_activation_checkpointing(model: nn.Module, section: ActivationCheckpointSection, container: str) -> None:
    if section.mode == "none":
        return
    blocks = blocks_of(model, container)
    if blocks is None:
        return
    every_nth = int(section.selective_option) if section.selective_option.isdigit() else 0
    for index, (name, block) in enumerate(list(blocks.named_children())):
        if section.mode == "full" or (every_nth and index % every_nth == 0):
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        elif section.mode == "selective" and not every_nth:
            wrapped = checkpoint_wrapper(block, context_fn=_selective_op_context, preserve_rng_state=False)
        else:
            continue
        blocks.register_module(name, wrapped)


def apply_compile(model: nn.Module, section: CompileSection, container: str, *, fullgraph: bool = True) -> None:
    """Compile each block in place (names and state-dict keys stay unchanged).

    ``fullgraph=False`` lets a block break its graph, for modules wrapped on their own
    inside a block whose hooks torch does not trace (FSDP2 runs them under
    ``torch._dynamo.disable``: the experts under expert parallelism)."""
    if not section.enable:
        return
    blocks = blocks_of(model, container)
    if blocks is None:
        model.compile(backend=section.backend, fullgraph=False)
        return
    for block in blocks.children():
        block.compile(backend=section.backend, fullgraph=fullgraph)

