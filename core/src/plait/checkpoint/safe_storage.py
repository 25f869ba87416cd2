"""Reading a checkpoint folder safely.

torch's DCP reader unpickles the ``.metadata`` file with plain ``pickle`` and loads
non-tensor entries with ``torch.load(weights_only=False)``: a crafted checkpoint could
run code. Here the metadata is unpickled by an unpickler that only builds DCP's
metadata records (and dtypes, sizes, paths), non-tensor entries are refused (plait
stores none: see ``plain_state``), and the files the metadata points to are checked
to exist and be long enough before any data is read, so that damage is reported as a
``CheckpointError`` that says what to do.
"""

from __future__ import annotations

import collections
import os
import pathlib
import pickle
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo

from plait.checkpoint.layout import list_checkpoints, step_of
from plait.errors import CheckpointError

_METADATA_FILE = ".metadata"

_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{
        ("torch.distributed.checkpoint.metadata", name): getattr(dcp_metadata, name)
        for name in (
            "Metadata",
            "StorageMeta",
            "MetadataIndex",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
        )
    },
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
    ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,  # a path record only, never used
    ("pathlib", "PureWindowsPath"): pathlib.PureWindowsPath,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _RefusedGlobal(f"{module}.{name}")


def damaged(checkpoint_dir: str, problem: str) -> CheckpointError:
    """The error for a checkpoint whose files are damaged, with what to do next."""
    step = step_of(checkpoint_dir)
    earlier = [
        s
        for s in list_checkpoints(os.path.dirname(os.path.normpath(checkpoint_dir)))
        if step is not None and s < step
    ]
    if step is None:
        advice = "Use another checkpoint, or save this one again."
    elif earlier:
        advice = (
            f"Resume from the previous checkpoint with --checkpoint.load_step {earlier[-1]}, "
            f"or delete {checkpoint_dir} to resume from the latest remaining one."
        )
    else:
        advice = f"No earlier checkpoint exists: delete {checkpoint_dir} to start from scratch."
    return CheckpointError(f"Checkpoint {checkpoint_dir} is damaged: {problem}. {advice}")


def mismatch(checkpoint_dir: str, problem: str) -> CheckpointError:
    """The error for a checkpoint that is intact but does not fit this run."""
    return CheckpointError(
        f"Checkpoint {checkpoint_dir} does not match this run: {problem}. It was saved for "
        f"another model, flavor, optimizer or set of states; load a matching checkpoint, "
        f"or set --checkpoint.folder to a new folder to start a fresh run."
    )


class SafeFileSystemReader(dcp.FileSystemReader):
    """A DCP reader that unpickles only metadata records and checks the data files."""

    def __init__(self, checkpoint_dir: str) -> None:
        super().__init__(checkpoint_dir)
        self.checkpoint_dir = checkpoint_dir
        self._metadata: dcp_metadata.Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        if kwargs.get("rank") is not None:
            raise damaged(self.checkpoint_dir, f"its {_METADATA_FILE} file is missing")
        if self._metadata is None:
            metadata = _read_metadata_file(self.checkpoint_dir)
            _check_data_files(self.checkpoint_dir, metadata)
            self._metadata = metadata
        if self._metadata.storage_meta is None:
            self._metadata.storage_meta = dcp_metadata.StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


class TensorOnlyLoadPlanner(DefaultLoadPlanner):
    """Refuses non-tensor entries, which DCP would load with an unrestricted unpickler."""

    def load_bytes(self, read_item: Any, value: Any) -> None:
        raise CheckpointError(
            f"Refusing to load the non-tensor checkpoint entry {read_item.dest_index.fqn!r}: "
            f"plait checkpoints hold only tensors, so this one was not written by plait "
            f"or was tampered with."
        )


def load_tensors(
    checkpoint_dir: str,
    reader: SafeFileSystemReader,
    tensors: dict[str, torch.Tensor],
    *,
    process_group: Any = None,
) -> None:
    """Fill ``tensors`` in place from the checkpoint (resharding DTensors as needed)."""
    _translate_failures(
        checkpoint_dir,
        lambda: dcp.load(
            tensors,
            storage_reader=reader,
            planner=TensorOnlyLoadPlanner(),
            process_group=process_group,
            no_dist=not _distributed(),
        ),
    )


def _read_metadata_file(checkpoint_dir: str) -> dcp_metadata.Metadata:
    path = os.path.join(checkpoint_dir, _METADATA_FILE)
    try:
        with open(path, "rb") as file:
            metadata = _MetadataUnpickler(file).load()
    except FileNotFoundError:
        raise damaged(checkpoint_dir, f"its {_METADATA_FILE} file is missing") from None
    except _RefusedGlobal as refused:
        raise damaged(
            checkpoint_dir,
            f"its {_METADATA_FILE} file refers to {refused.name}, which checkpoint metadata "
            f"never contains (refused without running it; the file is corrupt or was tampered with)",
        ) from None
    except Exception as error:  # any garbling: truncated, bit flips, wrong record shapes
        raise damaged(
            checkpoint_dir, f"its {_METADATA_FILE} file cannot be read ({describe(error)})"
        ) from None
    if not (
        isinstance(metadata, dcp_metadata.Metadata)
        and isinstance(metadata.state_dict_metadata, dict)
        and isinstance(metadata.storage_data, dict)
        and isinstance(metadata.storage_meta, (dcp_metadata.StorageMeta, type(None)))
    ):
        raise damaged(checkpoint_dir, f"its {_METADATA_FILE} file does not hold checkpoint metadata")
    return metadata


def _check_data_files(checkpoint_dir: str, metadata: dcp_metadata.Metadata) -> None:
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        if (
            not isinstance(info, _StorageInfo)
            or not isinstance(name, str)
            or os.path.basename(name) != name
            or name in ("", ".", "..")
        ):
            raise damaged(checkpoint_dir, f"its {_METADATA_FILE} file names an invalid data file {name!r}")
        needed[name] = max(needed.get(name, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = os.path.join(checkpoint_dir, name)
        if not os.path.isfile(path):
            raise damaged(checkpoint_dir, f"its data file {name} is missing")
        actual = os.path.getsize(path)
        if actual < size:
            raise damaged(
                checkpoint_dir,
                f"its data file {name} is truncated ({actual} bytes, the metadata expects at least {size})",
            )


def _translate_failures(checkpoint_dir: str, action: Callable[[], Any]) -> Any:
    """Run a DCP call; report a failure as a ``CheckpointError`` instead of a traceback."""
    try:
        return action()
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as error:
        cause = root_cause(error)
        if isinstance(cause, CheckpointError):
            raise cause from None
        raise damaged(checkpoint_dir, f"reading its data failed ({describe(cause)})") from error


def root_cause(error: BaseException) -> BaseException:
    if isinstance(error, CheckpointException) and error.failures:
        inner, _trace = next(iter(error.failures.values()))
        return root_cause(inner)
    return error


def describe(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()
