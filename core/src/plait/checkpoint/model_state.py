"""Model and optimizer state keyed by the full model's FQNs, whatever the layout.

Under pipeline parallelism a rank holds several model parts; their state dicts are
merged (their keys are disjoint). The one optimizer spans all parts, so its state dict
is taken over a container of the parts and the container's prefix (the part index) is
removed again: the keys then do not depend on how the model was split, and DCP can
reshard a checkpoint into another split, world size or parallelism.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

_STATE = "state"
_PARAM_GROUPS = "param_groups"
_PARAMS = "params"


def model_state(model_parts: list[nn.Module]) -> dict[str, torch.Tensor]:
    """The parts' state dicts merged. A key several parts hold (a buffer that every
    pipeline stage keeps a copy of) must have the same value in each: the first is saved."""
    merged: dict[str, torch.Tensor] = {}
    for part in model_parts:
        for key, value in get_model_state_dict(part).items():
            merged.setdefault(key, cast(torch.Tensor, value))
    return merged


def set_model_state(model_parts: list[nn.Module], state: dict[str, torch.Tensor]) -> None:
    for part in model_parts:
        keys = get_model_state_dict(part).keys()
        set_model_state_dict(part, {key: state[key] for key in keys})


def optimizer_state(model_parts: list[nn.Module], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``{"state": {fqn: {...}}, "param_groups": [{..., "params": [fqn, ...]}]}``.

    Initializes the optimizer's state (a zero-learning-rate step) if it has none yet.
    """
    prefixed = cast(dict[str, Any], get_optimizer_state_dict(nn.ModuleList(model_parts), optimizer))
    return {
        _STATE: {_strip(fqn): value for fqn, value in prefixed[_STATE].items()},
        _PARAM_GROUPS: [
            {**group, _PARAMS: [_strip(fqn) for fqn in group[_PARAMS]]} for group in prefixed[_PARAM_GROUPS]
        ],
    }


def set_optimizer_state(
    model_parts: list[nn.Module], optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    container = nn.ModuleList(model_parts)
    current = cast(dict[str, Any], get_optimizer_state_dict(container, optimizer))
    with_prefix = {_strip(fqn): fqn for group in current[_PARAM_GROUPS] for fqn in group[_PARAMS]}
    set_optimizer_state_dict(
        container,
        optimizer,
        {
            _STATE: {with_prefix[fqn]: value for fqn, value in state[_STATE].items()},
            _PARAM_GROUPS: [
                {**group, _PARAMS: [with_prefix[fqn] for fqn in group[_PARAMS]]}
                for group in state[_PARAM_GROUPS]
            ],
        },
    )


def _strip(prefixed_fqn: str) -> str:
    part_index, _, fqn = prefixed_fqn.partition(".")
    if not part_index.isdigit() or not fqn:
        raise AssertionError(f"unexpected optimizer key {prefixed_fqn!r}")
    return fqn
