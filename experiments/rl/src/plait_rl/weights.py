"""Weights from the trainer to the generators: a shared-memory copy of the full state dict
with the policy version attached.

The trainer (rank 0) writes the new weights and the version under a lock and wakes the
generators; a generator copies them into its model under the same lock, so it never reads
a half-written state. The reference policy (for the KL penalty) is a second, frozen copy
of the first weights.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights, on the CPU, on rank 0 (every rank must call it: sharded
    parameters are gathered); the other ranks get an empty dict."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    distributed = dist.is_initialized() and dist.get_world_size() > 1
    options = StateDictOptions(full_state_dict=True, cpu_offload=distributed)
    state = get_model_state_dict(model, options=options)
    return {name: tensor.detach().to("cpu") for name, tensor in state.items()}


class SharedWeights:
    """Shared-memory weights and their version; pass it to ``torch.multiprocessing`` children."""

    def __init__(self, state: dict[str, torch.Tensor], *, version: int, context: Any,
                 with_reference: bool = False) -> None:  # fmt: skip
        self.tensors = {name: tensor.detach().clone().share_memory_() for name, tensor in state.items()}
        self.reference = ({name: tensor.detach().clone().share_memory_() for name, tensor in state.items()}
                          if with_reference else None)  # fmt: skip
        self._version = context.Value("q", version, lock=False)
        self._changed = context.Condition(context.Lock())
        self._stop = context.Event()

    @property
    def version(self) -> int:
        return int(self._version.value)

    def publish(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Write ``state`` (``full_state_dict``) as policy ``version`` and wake the generators."""
        missing = set(self.tensors) ^ set(state)
        if missing:
            raise ValueError(f"the published weights differ in names from the generators' model: {sorted(missing)[:5]}")
        with self._changed:
            for name, tensor in state.items():
                self.tensors[name].copy_(tensor)
            self._version.value = version
            self._changed.notify_all()

    def pull(self, model: nn.Module, have: int) -> int:
        """Load the latest weights into ``model`` unless it already holds them (version
        ``have``); returns the version it holds now."""
        with self._changed:
            version = self.version
            if version != have:
                model.load_state_dict(self.tensors, strict=True)
        return version

    def wait_for(self, version: int, *, poll_seconds: float = 1.0) -> bool:
        """Block until policy ``version`` (or a later one) is published; False once stopped."""
        with self._changed:
            while self.version < version:
                if self._stop.is_set():
                    return False
                self._changed.wait(poll_seconds)
        return not self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        with self._changed:
            self._changed.notify_all()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()


def load_reference(model: nn.Module, weights: SharedWeights) -> nn.Module | None:
    """A frozen copy of ``model`` holding the reference weights, or None without a reference."""
    if weights.reference is None:
        return None
    import copy

    reference = copy.deepcopy(model)
    reference.load_state_dict(weights.reference, strict=True)
    return reference.eval().requires_grad_(False)
