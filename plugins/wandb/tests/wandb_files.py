"""A tiny job that logs to an offline W&B run, and reading back what wandb wrote for it.

wandb 0.31 writes an offline run's history, config and summary only into its
transaction log, ``<dir>/wandb/offline-run-*-<id>/run-<id>.wandb``: a LevelDB-style log
(``:W&B`` header, 32 KiB blocks of records with a 7-byte header: CRC, length, type) of
``wandb.proto.wandb_internal_pb2.Record`` messages, the file that `wandb sync` uploads.
The Python datastore that used to read it is gone from wandb, so this reads it with
wandb's own protobuf classes.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

_HEADER = 7  # ":W&B", magic 0xBEE1 (2 bytes), version (1 byte)
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    pos, pending = _HEADER, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            continue
        pending = payload if kind in (_FULL, _FIRST) else pending + payload
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def offline_runs(wandb_dir: Path) -> list[Path]:
    """The offline runs' folders under ``wandb_dir`` (WANDB_DIR), oldest first."""
    return sorted(p for p in (Path(wandb_dir) / "wandb").glob("offline-run-*") if p.is_dir())


class OfflineRun:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        (self.log_file,) = folder.glob("run-*.wandb")
        self.run_id = self.log_file.stem[len("run-"):]
        self.history: dict[int, dict[str, float]] = {}
        self.config: dict[str, Any] = {}
        self.name = self.project = self.group = ""
        self.tags: list[str] = []
        self.exit_code: int | None = None
        for record in records(self.log_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
                self.name, self.project, self.group, self.tags = run.display_name, run.project, run.run_group, list(run.tags)
                self._update_config(run.config.update)
            elif kind == "config":
                self._update_config(record.config.update)
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                self.history.setdefault(int(row["_step"]), {}).update(row)
            elif kind == "exit":
                self.exit_code = record.exit.exit_code

    def _update_config(self, items: Any) -> None:
        for item in items:
            self.config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)

    def series(self, key: str) -> dict[int, float]:
        return {step: row[key] for step, row in sorted(self.history.items()) if key in row}


def offline_job(dump_folder, *extra: str, steps: int = 3) -> list[str]:
    """A fast llama3 job on the embedded corpus, logging to an offline W&B run."""
    return [
        "--config", "llama3_debugmodel",
        "--model.flavor", "debugmodel_tiny",
        "--training.steps", str(steps),
        "--training.seq_len", "64",
        "--training.local_batch_size", "2",
        "--lr_scheduler.warmup_steps", "2",
        "--metrics.progress", "off",
        "--metrics.enable_tensorboard", "False",
        "--job.dump_folder", str(dump_folder),
        "--plugins", "wandb",
        "--wandb.mode", "offline",
        *extra,
    ]
