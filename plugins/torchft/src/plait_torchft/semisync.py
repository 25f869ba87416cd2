"""Semi-synchronous training: each replica group steps on its own and the groups meet
every ``sync_every`` steps.

- LocalSGD: the parameters are averaged over the groups.
- DiLoCo: the change since the last meeting (``original - current``, a pseudo-gradient)
  is averaged over the groups, the parameters go back to the original and an outer
  Nesterov SGD steps with the averaged change; the result is the new original.

With ``fragments`` > 1 the parameters are cut into that many fragments, and fragment f
meets at steps ``s`` with ``s % sync_every == (f + 1) * sync_every / fragments % sync_every``,
so the communication is spread over the interval. All arithmetic runs on each rank's
local shards: the same rank of every group holds the same shards.

``average`` and ``commit`` are injected (torchft's manager in a run, plain functions in
tests): ``average(tensors)`` averages a list of tensors over the groups in place, and
``commit()`` returns whether every group agrees to apply the result.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

Average = Callable[[list[torch.Tensor]], None]


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


class SemiSync:
    def __init__(self, params: list[nn.Parameter], *, mode: str, sync_every: int, fragments: int,
                 outer_lr: float, outer_momentum: float, outer_nesterov: bool) -> None:
        self.mode = mode
        self.sync_every = sync_every
        size = -(-len(params) // fragments)
        self.fragments = [params[i:i + size] for i in range(0, len(params), size)]
        while len(self.fragments) < fragments:  # fewer parameters than fragments: empty ones
            self.fragments.append([])
        self.originals: list[list[torch.Tensor]] = []
        self.outer: list[torch.optim.SGD | None] = []
        for fragment in self.fragments:
            originals = [_local(p).detach().clone() for p in fragment]
            self.originals.append(originals)
            use_outer = mode == "diloco" and originals
            self.outer.append(torch.optim.SGD(originals, lr=outer_lr, momentum=outer_momentum,
                                              nesterov=outer_nesterov and outer_momentum > 0) if use_outer else None)

    def due(self, step: int) -> list[int]:
        """The fragments that meet at the end of ``step``."""
        count = len(self.fragments)
        return [f for f in range(count) if step % self.sync_every == (f + 1) * self.sync_every // count % self.sync_every]

    def meeting_steps(self) -> set[int]:
        """Offsets within the interval at which some fragment meets."""
        return {(f + 1) * self.sync_every // len(self.fragments) % self.sync_every for f in range(len(self.fragments))}

    @torch.no_grad()
    def sync(self, fragment: int, average: Average, commit: Callable[[], bool]) -> bool:
        """Meet for one fragment; returns whether the result was applied. Without a commit
        each group keeps its own parameters (and DiLoCo its original), and the next
        meeting covers the longer interval."""
        params = [_local(p) for p in self.fragments[fragment]]
        originals = self.originals[fragment]
        if self.mode == "local_sgd":
            averaged = [p.clone() for p in params]
            average(averaged)
            if not commit():
                return False
            for param, value in zip(params, averaged):
                param.copy_(value)
            return True
        pseudo_gradients = [original - param for original, param in zip(originals, params)]
        average(pseudo_gradients)
        if not commit():
            return False
        outer = self.outer[fragment]
        if outer is not None:
            for original, gradient in zip(originals, pseudo_gradients):
                original.grad = gradient
            outer.step()
            outer.zero_grad(set_to_none=True)
        for param, original in zip(params, originals):
            param.copy_(original)
        return True

    # ------------------------------------------------------------------ state (per rank)

    def state_dict(self) -> dict[str, Any]:
        return {
            "originals": [[t.clone() for t in fragment] for fragment in self.originals],
            "outer": [outer.state_dict() if outer is not None else None for outer in self.outer],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        for originals, saved in zip(self.originals, state["originals"]):
            for original, value in zip(originals, saved):
                original.copy_(value)
        for outer, saved in zip(self.outer, state["outer"]):
            if outer is not None and saved is not None:
                outer.load_state_dict(saved)
