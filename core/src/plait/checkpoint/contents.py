"""What a checkpoint holds, and reading it back into a run.

A checkpoint is a DCP folder holding only tensors, under these keys:

- ``model.<fqn>``: the model weights (sharded DTensors are saved shard by shard);
- ``optimizer.state.<fqn>.<name>``: the optimizer state tensors;
- ``_plait.optimizer.<rank>``: the rest of the optimizer state (each parameter group's
  settings and parameter FQNs) as JSON bytes, written by the lowest rank of each
  distinct record (one per pipeline stage, say);
- ``_plait.replicated``: the LR scheduler's and each extra state's state dict as JSON
  bytes, their tensors (an RNG state, say) under ``<name>.<path>``.

Every key is per parameter or replicated, so a checkpoint loads under another world
size, parallelism or pipeline split (DCP reshards), and no entry needs unpickling.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from plait.checkpoint.plain_state import join_tensors, tensor_refs, tensor_to_json
from plait.checkpoint.safe_storage import SafeFileSystemReader, damaged, describe, load_tensors, mismatch

FORMAT = 1
MODEL_PREFIX = "model."
REPLICATED_KEY = "_plait.replicated"
OPTIMIZER_RECORD_PREFIX = "_plait.optimizer."
_PLAIN_STATE_FLOOR = 1024**3


def load_model_state(
    checkpoint_dir: str, model_state_dict: dict[str, torch.Tensor], *, partial: bool = False, verify: bool = True
) -> None:
    """Fill the tensors of ``model_state_dict`` (plain or DTensor) in place with the
    checkpoint's model weights. Strict: the checkpoint must hold exactly these tensors,
    with these shapes, or a ``CheckpointError`` names the differences before anything is
    filled in. ``partial=True`` states that ``model_state_dict`` is one part of the model
    (a pipeline stage, say): the checkpoint may then hold more. ``verify=False`` skips
    the checksums. When torch.distributed is initialized, every rank must call it (DCP
    plans collectively)."""
    reader = SafeFileSystemReader(checkpoint_dir, verify=verify)
    metadata = reader.read_metadata()
    tensors = {f"{MODEL_PREFIX}{fqn}": tensor for fqn, tensor in model_state_dict.items()}
    check_model(checkpoint_dir, metadata, tensors, whole_model=None if partial else set(tensors))
    load_tensors(checkpoint_dir, reader, tensors)


def load_records(
    checkpoint_dir: str, reader: SafeFileSystemReader, metadata: Metadata, *, process_group: Any, limit: int
) -> dict[str, Any]:
    """Load and parse the JSON records: the replicated states and the optimizer's."""
    keys = [
        k
        for k in metadata.state_dict_metadata
        if k == REPLICATED_KEY or k.startswith(OPTIMIZER_RECORD_PREFIX)
    ]
    if REPLICATED_KEY not in keys:
        raise mismatch(checkpoint_dir, "it holds no plait state record (it was not written by plait)")
    check_declared_bytes(checkpoint_dir, metadata, keys, limit)
    buffers = {key: allocate(checkpoint_dir, metadata, key) for key in keys}
    load_tensors(checkpoint_dir, reader, buffers, process_group=process_group)
    records = {}
    for key, buffer in buffers.items():
        try:
            records[key] = tensor_to_json(buffer)
        except (ValueError, RecursionError) as error:
            raise damaged(checkpoint_dir, f"its record {key} is not valid JSON ({describe(error)})") from None
    return records


def replicated_entries(checkpoint_dir: str, record: Any) -> dict[str, Any]:
    if not isinstance(record, dict) or not isinstance(record.get("entries"), dict):
        raise damaged(checkpoint_dir, f"its record {REPLICATED_KEY} is malformed")
    if record.get("format") != FORMAT:
        raise mismatch(
            checkpoint_dir, f"it uses checkpoint format {record.get('format')!r}, this plait reads {FORMAT}"
        )
    return record["entries"]


def merge_optimizer_records(
    checkpoint_dir: str, records: Iterable[Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per parameter FQN: its group's hyperparameters and its state skeleton."""
    groups: dict[str, Any] = {}
    states: dict[str, Any] = {}
    try:
        for record in records:
            for fqn, state in record["state"].items():
                states.setdefault(fqn, state)
            for group in record["param_groups"]:
                hyperparameters = {k: v for k, v in group.items() if k != "params"}
                for fqn in group["params"]:
                    groups.setdefault(fqn, hyperparameters)
    except (KeyError, TypeError, AttributeError):
        raise damaged(checkpoint_dir, "its optimizer record is malformed") from None
    return groups, states


def optimizer_state_to_apply(
    checkpoint_dir: str,
    target: dict[str, Any],
    saved_groups: dict[str, Any],
    saved_state: dict[str, Any],
    loaded: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """The checkpoint's optimizer state, in this run's parameter groups and with the
    tensors just loaded."""

    def resolve(skeleton: Any, what: str) -> Any:
        unknown = [key for key in tensor_refs(skeleton) if key not in loaded]
        if unknown:
            raise mismatch(
                checkpoint_dir, f"the checkpoint's {what} has {unknown[0]}, which this optimizer lacks"
            )
        return join_tensors(skeleton, loaded)

    state = {}
    for fqn in target["state"]:
        if fqn not in saved_state:
            raise mismatch(checkpoint_dir, f"it holds no optimizer state for parameter {fqn}")
        state[fqn] = resolve(saved_state[fqn], f"optimizer state of {fqn}")
    param_groups = []
    for group in target["param_groups"]:
        fqns = group["params"]
        missing = [fqn for fqn in fqns if fqn not in saved_groups]
        if missing:
            raise mismatch(checkpoint_dir, f"it holds no optimizer settings for parameter {missing[0]}")
        if any(saved_groups[fqn] != saved_groups[fqns[0]] for fqn in fqns):
            raise mismatch(
                checkpoint_dir, "parameters of one optimizer group here were in different groups there"
            )
        hyperparameters = resolve(saved_groups[fqns[0]], "optimizer settings") if fqns else {}
        param_groups.append(
            {**{k: v for k, v in group.items() if k != "params"}, **hyperparameters, "params": fqns}
        )
    return {"state": state, "param_groups": param_groups}


def allocate(checkpoint_dir: str, metadata: Metadata, key: str) -> torch.Tensor:
    """An empty tensor of the shape and dtype the checkpoint records for ``key``."""
    entry = metadata.state_dict_metadata.get(key)
    if not isinstance(entry, TensorStorageMetadata) or not isinstance(entry.properties.dtype, torch.dtype):
        raise damaged(checkpoint_dir, f"its entry {key} is missing or not a tensor")
    size = tuple(entry.size)
    stored = sum(info.length for index, info in metadata.storage_data.items() if index.fqn == key)
    element_size = torch.empty((), dtype=entry.properties.dtype).element_size()
    if any(d < 0 for d in size) or math.prod(size) * element_size > stored:
        raise damaged(checkpoint_dir, f"its entry {key} claims more data than the checkpoint stores")
    return torch.empty(size, dtype=entry.properties.dtype)


def plain_state_limit(model_tensors: Iterable[torch.Tensor]) -> int:
    """The most bytes of plain state (records, scheduler, data loader, plugin states) a
    checkpoint of this model may declare: 1 GiB, or the model's size if larger."""
    return max(_PLAIN_STATE_FLOOR, sum(t.numel() * t.element_size() for t in model_tensors))


def check_declared_bytes(checkpoint_dir: str, metadata: Metadata, keys: Iterable[str], limit: int) -> None:
    """Before allocating entries whose sizes only the checkpoint states: refuse more than ``limit``."""
    total = 0
    for key in keys:
        entry = metadata.state_dict_metadata.get(key)
        if isinstance(entry, TensorStorageMetadata) and isinstance(entry.properties.dtype, torch.dtype):
            total += math.prod(entry.size) * torch.empty((), dtype=entry.properties.dtype).element_size()
    if total > limit:
        raise damaged(
            checkpoint_dir,
            f"its plain state entries declare {total} bytes, more than a run of this model keeps "
            f"({limit} bytes at most)",
        )


def check_model(
    checkpoint_dir: str, metadata: Metadata, tensors: dict[str, Any], *, whole_model: set[str] | None
) -> None:
    """The checkpoint's model tensors are the model's, with the same shapes. ``tensors``
    are the ones this process loads; ``whole_model`` the keys of the whole model (all
    ranks and pipeline stages), None for a deliberately partial load."""
    entries = metadata.state_dict_metadata
    problems = []
    missing = [key for key in tensors if key not in entries]
    if missing:
        problems.append(f"it has no {_names(missing)} ({len(missing)} of {len(tensors)} tensors are absent)")
    if whole_model is not None:
        extra = sorted(key for key in entries if key.startswith(MODEL_PREFIX) and key not in whole_model)
        if extra:
            problems.append(f"it holds {_names(extra)}, which this model lacks ({len(extra)} tensors)")
    differing = []
    for key, tensor in tensors.items():
        entry = entries.get(key)
        if entry is None:
            continue
        if not isinstance(entry, TensorStorageMetadata):
            raise damaged(checkpoint_dir, f"its entry {key} is not a tensor")
        if tuple(entry.size) != tuple(tensor.shape):
            differing.append(f"{key} has shape {tuple(entry.size)} there but {tuple(tensor.shape)} here")
    if differing:
        problems.append(_names(differing, sep="; "))
    if problems:
        raise mismatch(checkpoint_dir, "; ".join(problems))


def _names(items: list[str], *, sep: str = ", ", shown: int = 6) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return sep.join(items[:shown]) + more


def check_against_metadata(checkpoint_dir: str, metadata: Metadata, tensors: dict[str, Any]) -> None:
    entries = metadata.state_dict_metadata
    missing = [key for key in tensors if key not in entries]
    if missing:
        raise mismatch(
            checkpoint_dir, f"it has no {missing[0]} ({len(missing)} of {len(tensors)} tensors are absent)"
        )
    for key, tensor in tensors.items():
        entry = entries[key]
        if not isinstance(entry, TensorStorageMetadata):
            raise damaged(checkpoint_dir, f"its entry {key} is not a tensor")
        if tuple(entry.size) != tuple(tensor.shape):
            raise mismatch(
                checkpoint_dir, f"{key} has shape {tuple(entry.size)} there but {tuple(tensor.shape)} here"
            )
