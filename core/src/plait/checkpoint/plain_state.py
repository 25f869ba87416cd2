"""Plain (non-tensor) state stored without pickle.

A state dict such as an LR scheduler's or a dataloader's is split into a JSON skeleton,
in which every tensor is replaced by a reference to a checkpoint key, and the tensors
themselves. The skeleton is stored as UTF-8 bytes in a uint8 tensor, so a checkpoint
holds only tensors and loading one never unpickles anything but tensor data.

Allowed values: tensors, None, bool, int, float (inf and nan too), str, and lists,
tuples and dicts of these. Dict keys may be any of the scalar types or tuples of them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from plait.errors import CheckpointError

# A JSON object with one of these keys stands for a value JSON cannot express directly.
_TUPLE = "__tuple__"
_TENSOR = "__tensor__"
_ITEMS = "__items__"
_TAGS = frozenset({_TUPLE, _TENSOR, _ITEMS})

_SCALARS = (type(None), bool, int, float, str)


@dataclass(kw_only=True, slots=True)
class SplitState:
    skeleton: Any
    """JSON-ready data; each tensor is replaced by ``{"__tensor__": <checkpoint key>}``."""
    tensors: dict[str, torch.Tensor]
    """The tensors, by checkpoint key: ``<key_prefix>.<path>`` (path parts joined by dots)."""


def split_tensors(value: Any, *, key_prefix: str) -> SplitState:
    tensors: dict[str, torch.Tensor] = {}

    def encode(item: Any, path: tuple[str, ...]) -> Any:
        if isinstance(item, torch.Tensor):
            key = ".".join((key_prefix, *path))
            if key in tensors:
                raise CheckpointError(
                    f"Cannot checkpoint {key_prefix}: two tensors map to the checkpoint key "
                    f"{key!r}; rename the state dict entries so dotted paths are unique."
                )
            tensors[key] = item
            return {_TENSOR: key}
        if isinstance(item, _SCALARS):
            return item
        if isinstance(item, list):
            return [encode(v, (*path, str(i))) for i, v in enumerate(item)]
        if isinstance(item, tuple):
            return {_TUPLE: [encode(v, (*path, str(i))) for i, v in enumerate(item)]}
        if isinstance(item, dict):
            if all(isinstance(k, str) and k not in _TAGS for k in item):
                return {k: encode(v, (*path, k)) for k, v in item.items()}
            pairs = []
            for k, v in item.items():
                if not isinstance(k, (tuple, *_SCALARS)):
                    raise _unsupported(key_prefix, (*path, repr(k)), k)
                pairs.append([encode(k, path), encode(v, (*path, str(k)))])
            return {_ITEMS: pairs}
        raise _unsupported(key_prefix, path, item)

    return SplitState(skeleton=encode(value, ()), tensors=tensors)


def join_tensors(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_tensors`: rebuild the value, taking tensors from ``tensors``."""

    def decode(item: Any) -> Any:
        if isinstance(item, list):
            return [decode(v) for v in item]
        if not isinstance(item, dict):
            return item
        if len(item) == 1 and _TENSOR in item:
            return tensors[item[_TENSOR]]
        if len(item) == 1 and _TUPLE in item:
            return tuple(decode(v) for v in item[_TUPLE])
        if len(item) == 1 and _ITEMS in item:
            return {decode(k): decode(v) for k, v in item[_ITEMS]}
        return {k: decode(v) for k, v in item.items()}

    return decode(skeleton)


def tensor_refs(skeleton: Any) -> list[str]:
    """The checkpoint keys of the tensors a skeleton refers to, in order."""
    refs: list[str] = []

    def visit(item: Any) -> None:
        if isinstance(item, list):
            for v in item:
                visit(v)
        elif isinstance(item, dict):
            if len(item) == 1 and _TENSOR in item:
                refs.append(item[_TENSOR])
            else:
                for v in item.values():
                    visit(v)

    visit(skeleton)
    return refs


def json_to_tensor(data: Any) -> torch.Tensor:
    encoded = json.dumps(data, separators=(",", ":"), allow_nan=True).encode()
    return torch.frombuffer(bytearray(encoded), dtype=torch.uint8)


def tensor_to_json(tensor: torch.Tensor) -> Any:
    """Raises ``ValueError`` (or ``RecursionError``) when the bytes are not valid JSON."""
    return json.loads(tensor.numpy().tobytes().decode())


def fingerprint(split: SplitState) -> str:
    """A digest of the skeleton and the tensor bytes, to compare a state across ranks."""
    digest = hashlib.sha256(json.dumps(split.skeleton, allow_nan=True).encode())
    for key in sorted(split.tensors):
        tensor = split.tensors[key].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}:{tensor.dtype}:{tuple(split.tensors[key].shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _unsupported(key_prefix: str, path: tuple[str, ...], value: Any) -> CheckpointError:
    return CheckpointError(
        f"Cannot checkpoint {'.'.join((key_prefix, *path))}: a value of type "
        f"{type(value).__name__} is not supported. A checkpointed state dict may hold only "
        f"tensors, None, bool, int, float, str, and lists, tuples and dicts of these; "
        f"make its state_dict() return plain data."
    )
