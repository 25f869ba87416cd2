"""Checksums of what a checkpoint stores, recorded when it is written.

Every rank hashes (SHA-256) each item it wrote, reading it back right after writing it
(from the page cache, usually); the ranks' hashes travel to the coordinating rank with
DCP's own write results, and it writes them, with the hash of the ``.metadata`` file,
to ``.checksums.json`` before the save finishes, so before the checkpoint is published.
The loader checks each item it reads (``safe_storage``). A checkpoint that has
checksums says so in its metadata (the tiny tensor ``_plait.checksums``), so that a
lost manifest is noticed as well.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

MANIFEST_FILE = ".checksums.json"
MARKER_KEY = "_plait.checksums"
ALGORITHM = "sha256"
MANIFEST_FORMAT = 1
_METADATA_FILE = ".metadata"
_BLOCK = 8 * 1024 * 1024
_THREADS = max(1, min(8, (os.cpu_count() or 1)))


def marker_tensor() -> torch.Tensor:
    """The entry that says: this checkpoint has a checksum manifest."""
    encoded = json.dumps({"manifest": MANIFEST_FILE, "algorithm": ALGORITHM}).encode()
    return torch.frombuffer(bytearray(encoded), dtype=torch.uint8)


def hash_range(file: BinaryIO, offset: int, length: int) -> str:
    """The SHA-256 of ``length`` bytes at ``offset``; a short read hashes what is there."""
    digest = hashlib.sha256()
    buffer = bytearray(min(_BLOCK, max(length, 1)))
    view = memoryview(buffer)
    file.seek(offset)
    left = length
    while left > 0:
        got = file.readinto(view[: min(left, len(buffer))])
        if not got:
            break
        digest.update(view[:got])
        left -= got
    return digest.hexdigest()


def hash_items(folder: str, items: list[tuple[str, int, int]]) -> list[str]:
    """The SHA-256 of each ``(file name, offset, length)`` item of ``folder``, on a few
    threads (hashing releases the GIL)."""

    def one(item: tuple[str, int, int]) -> str:
        name, offset, length = item
        with open(os.path.join(folder, name), "rb", buffering=0) as file:
            return hash_range(file, offset, length)

    if len(items) <= 1:
        return [one(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(len(items), _THREADS)) as pool:
        return list(pool.map(one, items))


@dataclasses.dataclass
class _HashedStorageInfo(_StorageInfo):
    """A write result's storage record plus the item's hash, on its way to the coordinator."""

    sha256: str | None = None


class ChecksummingWriter(dcp.FileSystemWriter):
    """DCP's file writer, recording a checksum of every item and of the metadata."""

    def write_data(self, plan: Any, planner: Any) -> Future[list[WriteResult]]:
        results = super().write_data(plan, planner).wait()
        infos = [result.storage_data for result in results]
        digests = hash_items(str(self.path), [(info.relative_path, info.offset, info.length) for info in infos])
        hashed = [
            dataclasses.replace(
                result,
                storage_data=_HashedStorageInfo(
                    result.storage_data.relative_path,
                    result.storage_data.offset,
                    result.storage_data.length,
                    result.storage_data.transform_descriptors,
                    sha256=digest,
                ),
            )
            for result, digest in zip(results, digests, strict=True)
        ]
        future: Future[list[WriteResult]] = Future()
        future.set_result(hashed)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        items: dict[str, list[list[Any]]] = {}
        plain: list[list[WriteResult]] = []
        for rank_results in results:
            row = []
            for result in rank_results:
                info = result.storage_data
                if isinstance(info, _HashedStorageInfo):
                    items.setdefault(info.relative_path, []).append([info.offset, info.length, info.sha256])
                    info = _StorageInfo(info.relative_path, info.offset, info.length, info.transform_descriptors)
                row.append(dataclasses.replace(result, storage_data=info))
            plain.append(row)
        super().finish(metadata, plain)

        metadata_path = os.path.join(self.path, _METADATA_FILE)
        with open(metadata_path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            metadata_hash = hash_range(file, 0, size)
        manifest = {
            "format": MANIFEST_FORMAT,
            "algorithm": ALGORITHM,
            "metadata": {"size": size, ALGORITHM: metadata_hash},
            "items": {name: sorted(entries) for name, entries in sorted(items.items())},
        }
        path = os.path.join(self.path, MANIFEST_FILE)
        with open(path + ".tmp", "w") as file:
            json.dump(manifest, file, separators=(",", ":"))
            file.flush()
            if self.sync_files:
                os.fsync(file.fileno())
        os.replace(path + ".tmp", path)
