"""Reading a checkpoint folder safely.

torch's DCP reader unpickles the ``.metadata`` file with plain ``pickle`` and loads
non-tensor entries with ``torch.load(weights_only=False)``: a crafted checkpoint could
run code. Here the metadata is unpickled by an unpickler that allows only the pickle
operations and globals DCP's metadata records need (see ``_MetadataUnpickler``), the
records are checked to have the types and shapes DCP writes, non-tensor entries are
refused (plait stores none: see ``plain_state``), and the files the metadata points to
are checked before any data is read: regular files (never links), long enough, items
not overlapping and not larger than the tensor chunks they hold. Every item read is
checked against the checksum recorded when it was written (``checksums``). Damage is
reported as a ``CheckpointError`` that names the file and the checkpoint to fall back to.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import pickletools
import pathlib
import pickle
import stat
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo

from plait.checkpoint.checksums import ALGORITHM, MANIFEST_FILE, MANIFEST_FORMAT, MARKER_KEY, hash_items
from plait.checkpoint.layout import list_checkpoints, step_of
from plait.errors import CheckpointError

logger = logging.getLogger(__name__)
_METADATA_FILE = ".metadata"

_METADATA_LIMIT = 1024**3  # a metadata file (or checksum manifest) larger than this is refused
_ITEM_OVERHEAD = 64 * 1024  # torch.save's framing of one stored chunk is about 1.5 KiB

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
    **{("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)},
}
# What REDUCE may call (with a tuple of arguments), and the records NEWOBJ may create
# (with no arguments) and BUILD may fill in (with their own fields only).
_CALLABLE = (
    torch.Size,
    torch.serialization._get_layout,
    collections.OrderedDict,
    pathlib.PosixPath,
    pathlib.PurePosixPath,
    pathlib.PureWindowsPath,
    dcp_metadata._MEM_FORMAT_ENCODING,
)
_RECORDS = (
    dcp_metadata.Metadata,
    dcp_metadata.StorageMeta,
    dcp_metadata.MetadataIndex,
    dcp_metadata.TensorStorageMetadata,
    dcp_metadata.BytesStorageMetadata,
    dcp_metadata.ChunkStorageMetadata,
    dcp_metadata.TensorProperties,
    _StorageInfo,
)
_RECORD_FIELDS = {record: frozenset(f.name for f in dataclasses.fields(record)) for record in _RECORDS}
_OPCODE_NAMES = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}
# Data, containers, memo and framing: nothing here calls or looks up anything.
_PLAIN_OPCODES = (
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP",
    "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GET", "BINGET", "LONG_BINGET",
    "NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4",
    "FLOAT", "BINFLOAT", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
    "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_LIST", "LIST", "EMPTY_DICT", "DICT",
    "EMPTY_SET", "FROZENSET", "GLOBAL", "STACK_GLOBAL",
)  # fmt: skip


class _Refused(pickle.UnpicklingError):
    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class _OnlyAllowed(dict):  # type: ignore[type-arg]
    def __missing__(self, code: int) -> Any:
        if code not in _OPCODE_NAMES:
            raise pickle.UnpicklingError(f"invalid load key {code:#x}")  # garbled, not crafted
        raise _Refused(f"the pickle operation {_OPCODE_NAMES[code]}")


def _kind(value: Any) -> str:
    return f"the class {value.__qualname__}" if isinstance(value, type) else f"a {type(value).__qualname__}"


class _MetadataUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Python's own unpickler (the pure-Python one) with an allow-list of operations:
    only globals of the table above, REDUCE only of the callables above, NEWOBJ and BUILD
    only of DCP's metadata records and their fields, containers only of plain types.
    INST, OBJ, NEWOBJ_EX, extensions and persistent ids are refused outright."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise _Refused(f"{module}.{name}")
        return allowed

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if not any(func is allowed for allowed in _CALLABLE) or type(args) is not tuple:
            raise _Refused(f"a call of {_kind(func)}")
        self.stack[-1] = func(*args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        if not any(cls is record for record in _RECORDS) or args != ():
            raise _Refused(f"the creation of {_kind(cls)}")
        self.append(cls.__new__(cls))

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        cls = type(inst)
        if cls not in _RECORD_FIELDS:
            raise _Refused(f"setting the state of {_kind(inst)}")
        if "__setstate__" in vars(cls):  # TensorProperties: a tuple of plain values
            if type(state) is not tuple:
                raise _Refused(f"a {_kind(state)} as the state of {cls.__qualname__}")
            cls.__setstate__(inst, state)
            return
        parts = state if type(state) is tuple and len(state) == 2 else (state, None)
        for part in parts:
            if part is None:
                continue
            if type(part) is not dict or not set(part) <= _RECORD_FIELDS[cls]:
                raise _Refused(f"setting attributes of {cls.__qualname__} that it does not have")
            inst.__dict__.update(part)

    def load_append(self) -> None:
        value = self.stack.pop()
        self._container(list).append(value)

    def load_appends(self) -> None:
        items = self.pop_mark()
        self._container(list).extend(items)

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._container(dict, collections.OrderedDict)[key] = value

    def load_setitems(self) -> None:
        items = self.pop_mark()
        target = self._container(dict, collections.OrderedDict)
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def load_additems(self) -> None:
        items = self.pop_mark()
        self._container(set).update(items)

    def _container(self, *types: type) -> Any:
        target = self.stack[-1]
        if type(target) not in types:
            raise _Refused(f"adding items to {_kind(target)}")
        return target

    dispatch = _OnlyAllowed(
        {
            **{
                code: pickle._Unpickler.dispatch[code]  # type: ignore[attr-defined]
                for code in (getattr(pickle, name)[0] for name in _PLAIN_OPCODES)
            },
            pickle.REDUCE[0]: load_reduce,
            pickle.NEWOBJ[0]: load_newobj,
            pickle.BUILD[0]: load_build,
            pickle.APPEND[0]: load_append,
            pickle.APPENDS[0]: load_appends,
            pickle.SETITEM[0]: load_setitem,
            pickle.SETITEMS[0]: load_setitems,
            pickle.ADDITEMS[0]: load_additems,
        }
    )


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
            f"Resume from the previous checkpoint with --checkpoint.load_step {earlier[-1]} "
            f"--checkpoint.newer_checkpoints move_aside (this one is kept under superseded/), "
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
    """A DCP reader that unpickles only metadata records, checks the declared sizes
    against the files, and (``verify``) checks every item it reads against the
    checksum recorded when the checkpoint was written."""

    def __init__(self, checkpoint_dir: str, *, verify: bool = True) -> None:
        super().__init__(checkpoint_dir)
        self.checkpoint_dir = checkpoint_dir
        self.verify = verify
        self._metadata: dcp_metadata.Metadata | None = None
        self._checksums: dict[tuple[str, int, int], str] | None = None
        self._names: dict[tuple[str, int], str] = {}

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        if kwargs.get("rank") is not None:
            raise damaged(self.checkpoint_dir, f"its {_METADATA_FILE} file is missing")
        if self._metadata is None:
            metadata, raw = _read_metadata_file(self.checkpoint_dir)
            _check_metadata(self.checkpoint_dir, metadata)
            _check_data_files(self.checkpoint_dir, metadata)
            if self.verify:
                self._checksums = _read_checksums(self.checkpoint_dir, metadata, raw)
            self._names = {
                (info.relative_path, info.offset): index.fqn for index, info in metadata.storage_data.items()
            }
            self._metadata = metadata
        if self._metadata.storage_meta is None:
            self._metadata.storage_meta = dcp_metadata.StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata

    def read_data(self, plan: Any, planner: Any) -> Any:
        # Every item this rank reads is checked before any is copied into the run: a
        # damaged checkpoint leaves the run's tensors as they were.
        if self._checksums is not None:
            items = sorted(
                {
                    (info.relative_path, info.offset, info.length)
                    for info in (self.storage_data[item.storage_index] for item in plan.items)
                }
            )
            for item, digest in zip(items, hash_items(self.checkpoint_dir, items), strict=True):
                if digest != self._checksums[item]:
                    name, offset, length = item
                    raise damaged(
                        self.checkpoint_dir,
                        f"its data file {name} does not match the checksum recorded when it was saved "
                        f"(bytes {offset}-{offset + length}, holding {self._names.get((name, offset), '?')}): "
                        f"the file was changed or corrupted on disk",
                    )
        return super().read_data(plan, planner)


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


def _read_metadata_file(checkpoint_dir: str) -> tuple[dcp_metadata.Metadata, bytes]:
    raw = _read_small_file(checkpoint_dir, _METADATA_FILE)
    if raw is None:
        raise damaged(checkpoint_dir, f"its {_METADATA_FILE} file is missing")
    try:
        metadata = _MetadataUnpickler(io.BytesIO(raw)).load()
    except _Refused as refused:
        raise damaged(
            checkpoint_dir,
            f"its {_METADATA_FILE} file refers to {refused.what}, which checkpoint metadata "
            f"never contains (refused without running it; the file is corrupt or was tampered with)",
        ) from None
    except Exception as error:  # any garbling: truncated, bit flips, wrong record shapes
        raise damaged(
            checkpoint_dir, f"its {_METADATA_FILE} file cannot be read ({describe(error)})"
        ) from None
    return metadata, raw


def _read_small_file(checkpoint_dir: str, name: str) -> bytes | None:
    """The bytes of a metadata-sized file of the checkpoint, None if it does not exist;
    a link or an oversized file is damage."""
    path = os.path.join(checkpoint_dir, name)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as error:
        if os.path.islink(path):
            raise damaged(checkpoint_dir, f"its {name} is a symbolic link, which checkpoints never contain") from None
        raise damaged(checkpoint_dir, f"its {name} file cannot be opened ({describe(error)})") from None
    with os.fdopen(descriptor, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise damaged(checkpoint_dir, f"its {name} is not a regular file")
        if info.st_size > _METADATA_LIMIT:
            raise damaged(
                checkpoint_dir, f"its {name} file has {info.st_size} bytes, more than a checkpoint's ever has"
            )
        return file.read(_METADATA_LIMIT + 1)


def _is_size(value: Any) -> bool:
    return isinstance(value, torch.Size) and all(type(d) is int and d >= 0 for d in value)


def _check_metadata(checkpoint_dir: str, metadata: Any) -> None:
    """Every record has the types and shapes DCP writes: nothing else reaches the loader."""

    def bad(problem: str) -> CheckpointError:
        return damaged(checkpoint_dir, f"its {_METADATA_FILE} file {problem}")

    if not (
        type(metadata) is dcp_metadata.Metadata
        and type(getattr(metadata, "state_dict_metadata", None)) is dict
        and type(getattr(metadata, "storage_data", None)) is dict
        and type(getattr(metadata, "storage_meta", None)) in (dcp_metadata.StorageMeta, type(None))
    ):
        raise bad("does not hold checkpoint metadata")
    for key, entry in metadata.state_dict_metadata.items():
        if type(key) is not str:
            raise bad("has an entry whose name is not a string")
        if type(entry) is dcp_metadata.BytesStorageMetadata:
            continue
        properties = getattr(entry, "properties", None)
        if not (
            type(entry) is dcp_metadata.TensorStorageMetadata
            and type(properties) is dcp_metadata.TensorProperties
            and isinstance(getattr(properties, "dtype", None), torch.dtype)
            and _is_size(getattr(entry, "size", None))
            and type(getattr(entry, "chunks", None)) is list
        ):
            raise bad(f"has a malformed entry {key}")
        for chunk in entry.chunks:
            if not (
                type(chunk) is dcp_metadata.ChunkStorageMetadata
                and _is_size(getattr(chunk, "offsets", None))
                and _is_size(getattr(chunk, "sizes", None))
                and len(chunk.offsets) == len(chunk.sizes) == len(entry.size)
                and all(o + s <= d for o, s, d in zip(chunk.offsets, chunk.sizes, entry.size))
            ):
                raise bad(f"has a chunk of {key} that lies outside its shape {tuple(entry.size)}")
    for index, info in metadata.storage_data.items():
        if not (
            type(index) is dcp_metadata.MetadataIndex
            and type(getattr(index, "fqn", None)) is str
            and (index.offset is None or _is_size(index.offset))
            and type(info) is _StorageInfo
            and type(getattr(info, "offset", None)) is int
            and type(getattr(info, "length", None)) is int
            and info.offset >= 0
            and info.length >= 0
        ):
            raise bad("has a malformed storage record")
        if getattr(info, "transform_descriptors", None):
            raise bad(f"declares storage transforms for {index.fqn}, which plait never writes")


def _check_data_files(checkpoint_dir: str, metadata: dcp_metadata.Metadata) -> None:
    """The data files exist, are regular files, hold every declared item, items do not
    overlap, and no item is larger than the tensor chunk it stores: so no declared size
    makes the loader read or allocate more than the checkpoint's tensors need."""
    chunk_bytes: dict[tuple[str, tuple[int, ...]], int] = {}
    for key, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, dcp_metadata.TensorStorageMetadata):
            element = torch.empty((), dtype=entry.properties.dtype).element_size()
            for chunk in entry.chunks:
                chunk_bytes[(key, tuple(chunk.offsets))] = math.prod(chunk.sizes) * element
    per_file: dict[str, list[tuple[int, int, str]]] = {}
    for index, info in metadata.storage_data.items():
        name = info.relative_path
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise damaged(checkpoint_dir, f"its {_METADATA_FILE} file names an invalid data file {name!r}")
        entry = metadata.state_dict_metadata.get(index.fqn)
        if isinstance(entry, dcp_metadata.TensorStorageMetadata):
            expected = chunk_bytes.get((index.fqn, tuple(index.offset or ())))
            if expected is None:
                raise damaged(
                    checkpoint_dir, f"its {_METADATA_FILE} file stores a chunk of {index.fqn} it does not declare"
                )
            if info.length > expected + _ITEM_OVERHEAD:
                raise damaged(
                    checkpoint_dir,
                    f"its {_METADATA_FILE} file declares {info.length} bytes for a chunk of {index.fqn} "
                    f"that holds {expected}",
                )
        per_file.setdefault(name, []).append((info.offset, info.length, index.fqn))
    for name, items in sorted(per_file.items()):
        path = os.path.join(checkpoint_dir, name)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            raise damaged(checkpoint_dir, f"its data file {name} is missing") from None
        if stat.S_ISLNK(info.st_mode):
            raise damaged(checkpoint_dir, f"its data file {name} is a symbolic link, which checkpoints never contain")
        if not stat.S_ISREG(info.st_mode):
            raise damaged(checkpoint_dir, f"its data file {name} is not a regular file")
        items.sort()
        end = max(offset + length for offset, length, _ in items)
        if info.st_size < end:
            raise damaged(
                checkpoint_dir,
                f"its data file {name} is truncated ({info.st_size} bytes, the metadata expects at least {end})",
            )
        for (offset, length, fqn), (next_offset, _, next_fqn) in zip(items, items[1:]):
            if offset + length > next_offset:
                raise damaged(
                    checkpoint_dir, f"its {_METADATA_FILE} file declares overlapping data for {fqn} and {next_fqn}"
                )


_unverified_warned: set[str] = set()


def _read_checksums(
    checkpoint_dir: str, metadata: dcp_metadata.Metadata, raw_metadata: bytes
) -> dict[tuple[str, int, int], str] | None:
    """The recorded checksum of every stored item (None for a checkpoint written before
    plait recorded checksums); checks the metadata file's own checksum."""
    raw = _read_small_file(checkpoint_dir, MANIFEST_FILE)
    if raw is None:
        if MARKER_KEY in metadata.state_dict_metadata:
            raise damaged(checkpoint_dir, f"its checksum file {MANIFEST_FILE} is missing")
        if checkpoint_dir not in _unverified_warned:
            _unverified_warned.add(checkpoint_dir)
            logger.warning(
                "Checkpoint %s has no checksums (written by an earlier plait): loading it unverified",
                checkpoint_dir,
            )
        return None
    try:
        manifest = json.loads(raw.decode())
        recorded = str(manifest["metadata"][ALGORITHM])
        checksums = {
            (name, int(offset), int(length)): str(digest)
            for name, entries in manifest["items"].items()
            for offset, length, digest in entries
        }
        if manifest["algorithm"] != ALGORITHM or manifest["format"] != MANIFEST_FORMAT:
            raise ValueError(f"algorithm {manifest['algorithm']!r}, format {manifest['format']!r}")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
        raise damaged(checkpoint_dir, f"its checksum file {MANIFEST_FILE} cannot be read ({describe(error)})") from None
    if recorded != hashlib.sha256(raw_metadata).hexdigest():
        raise damaged(
            checkpoint_dir,
            f"its {_METADATA_FILE} file does not match the checksum recorded when it was saved: "
            f"the file was changed or corrupted on disk",
        )
    for index, info in metadata.storage_data.items():
        if (info.relative_path, info.offset, info.length) not in checksums:
            raise damaged(
                checkpoint_dir,
                f"its checksum file {MANIFEST_FILE} has no checksum of {index.fqn} in {info.relative_path}",
            )
    return checksums


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
