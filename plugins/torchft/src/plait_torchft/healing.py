"""The live state a restarted replica group fetches from a peer instead of a checkpoint.

It is what a checkpoint of the run holds (model, optimizer, LR schedule, data loader,
train state, the plugins' states) plus this plugin's per-rank state, taken from the
run's ``CheckpointManager``. Rank r of the healing group fetches from rank r of a live
group, which holds the same shards (the groups have the same layout), so sharded
tensors travel as their local shards and are rebuilt on the receiver's own layout.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_map

from plait.checkpoint.model_state import model_state, optimizer_state, set_model_state, set_optimizer_state


def _local(value: Any) -> Any:
    return value.to_local() if isinstance(value, DTensor) else value


def _like(template: Any, received: Any) -> Any:
    """``received`` (a local shard) as the receiver's tensor of the same name."""
    if isinstance(template, DTensor):
        return DTensor.from_local(received, template.device_mesh, template.placements, run_check=False,
                                  shape=template.shape, stride=template.stride())
    if isinstance(template, torch.Tensor) and isinstance(received, torch.Tensor):
        return received.to(template.device)
    return received


def _rebuild(template: dict[str, Any], received: dict[str, Any]) -> dict[str, Any]:
    if set(template) != set(received):
        missing, extra = sorted(set(template) - set(received)), sorted(set(received) - set(template))
        raise RuntimeError(f"the peer's state does not match this model: missing {missing[:5]}, unexpected {extra[:5]}; "
                           "every replica group must train the same model with the same layout")
    return {key: _rebuild(value, received[key]) if isinstance(value, dict) else _like(value, received[key])
            for key, value in template.items()}


def live_state(checkpointer: Any, inner_optimizer: torch.optim.Optimizer, *, own_key: str,
               own_state: Callable[[], dict[str, Any]], states: dict[str, Any] | None = None) -> dict[str, Any]:
    """This rank's state for a peer to heal from. ``own_key`` names this plugin's entry
    among the checkpointed states: it travels as ``own_state()`` (per-rank data) instead.
    ``states``: the other checkpointed states' state dicts as of the step's start (else
    read now)."""
    parts = checkpointer.model_parts
    return {
        "model": tree_map(_local, model_state(parts)),
        # An optimizer that never stepped has no state; initializing it here would count a step.
        "optimizer": tree_map(_local, optimizer_state(parts, inner_optimizer)) if inner_optimizer.state else None,
        "lr_scheduler": checkpointer.lr_scheduler.state_dict(),
        "states": states if states is not None else {
            name: obj.state_dict() for name, obj in checkpointer.states.items() if name != own_key},
        own_key: own_state(),
    }


def load_live_state(checkpointer: Any, inner_optimizer: torch.optim.Optimizer, state: dict[str, Any], *,
                    own_key: str, load_own: Callable[[dict[str, Any]], None]) -> None:
    parts = checkpointer.model_parts
    with torch.no_grad():
        set_model_state(parts, _rebuild(model_state(parts), state["model"]))
    if state["optimizer"] is not None:
        template = optimizer_state(parts, inner_optimizer)
        set_optimizer_state(parts, inner_optimizer, {
            "state": _rebuild(template["state"], state["optimizer"]["state"]),
            "param_groups": state["optimizer"]["param_groups"],
        })
    scheduler = checkpointer.lr_scheduler
    scheduler.load_state_dict(state["lr_scheduler"])
    for group, lr in zip(inner_optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    for name, obj in checkpointer.states.items():
        if name != own_key:
            obj.load_state_dict(state["states"][name])
    load_own(state[own_key])
