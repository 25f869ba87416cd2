"""Checkpoints under attack and damage: two runs on one folder, flipped bytes, another
model, planted links, HF index traversal, pickle gadgets, oversized declared sizes.

Every failure is one ``CheckpointError`` or ``ConfigError`` that says what is wrong and
what to do, and nothing is half-written or run."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import pathlib
import pickle
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from plait.checkpoint import list_checkpoints, load_model_state
from plait.checkpoint import lock as run_lock
from plait.errors import CheckpointError, ConfigError
from test_checkpoint import assert_equal_tensors, checkpoint_dir, make_run, visible

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

GiB = 1024**3


def saved_run(tmp_path: Path, steps: tuple[int, ...] = (1, 2), **config: Any) -> dict[int, dict[str, torch.Tensor]]:
    """A run saved at ``steps``; returns its weights at each."""
    run = make_run(seed=0)
    manager = run.manager(tmp_path, **config)
    weights = {}
    for step in steps:
        run.train(1)
        manager.save(step)
        weights[step] = run.weights()
    manager.close()
    return weights


# ------------------------------------------------------------------------ 1. two runs, one folder


def _hold_lock(folder: str, conn: Any) -> None:
    run_lock.acquire(folder)
    conn.send("locked")
    conn.recv()  # until told to go, or killed


def _holder(folder: Path) -> tuple[multiprocessing.Process, Any]:
    parent, child = multiprocessing.get_context("fork").Pipe()
    process = multiprocessing.get_context("fork").Process(target=_hold_lock, args=(str(folder), child))
    process.start()
    assert parent.poll(30) and parent.recv() == "locked"
    return process, parent


def test_a_second_run_on_the_folder_stops_naming_the_holder(tmp_path):
    process, conn = _holder(tmp_path / "checkpoint")
    try:
        with pytest.raises(ConfigError) as raised:
            make_run(seed=0).manager(tmp_path)
        message = str(raised.value)
        assert f"{tmp_path / 'checkpoint'} is in use by another run" in message
        assert f"pid {process.pid} on host {socket.gethostname()} (since " in message
        assert "--job.dump_folder or --checkpoint.folder" in message
        assert not (tmp_path / "checkpoint" / "step-1.partial").exists()
    finally:
        conn.send("go")
        process.join(30)
    # Released: the folder is free again, and this process shares its own lock.
    manager = make_run(seed=0).manager(tmp_path)
    other = make_run(seed=1).manager(tmp_path)
    manager.save(1)
    assert other.load() == 1
    manager.close()
    other.close()


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
    process, _conn = _holder(tmp_path / "checkpoint")
    os.kill(process.pid, signal.SIGKILL)
    process.join(30)
    with caplog.at_level(logging.WARNING, logger="plait.checkpoint.lock"):
        manager = make_run(seed=0).manager(tmp_path)
    assert f"left by pid {process.pid} on host {socket.gethostname()}" in caplog.text
    holder = json.loads((tmp_path / "checkpoint" / ".lock").read_text())
    assert holder["pid"] == os.getpid()
    manager.close()
    assert (tmp_path / "checkpoint" / ".lock").read_text() == ""  # released


def _dead_pid() -> int:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def test_without_flock_a_marker_file_locks_and_a_dead_pid_marker_is_taken_over(tmp_path, monkeypatch):
    def no_flock(fd: int, operation: int) -> None:
        raise OSError(37, "No locks available")  # ENOLCK: a file system without flock

    monkeypatch.setattr(run_lock.fcntl, "flock", no_flock)
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    marker = folder / ".lock.held"
    host = socket.gethostname()
    since = "2026-01-01 00:00:00 UTC"
    marker.write_text(json.dumps({"pid": os.getppid(), "host": host, "since": since}))  # alive
    with pytest.raises(ConfigError, match=rf"pid {os.getppid()} on host .*delete {marker}"):
        make_run(seed=0).manager(tmp_path)
    marker.write_text(json.dumps({"pid": 12345, "host": "elsewhere", "since": since}))  # unknowable
    with pytest.raises(ConfigError, match=r"pid 12345 on host elsewhere"):
        make_run(seed=0).manager(tmp_path)

    marker.write_text(json.dumps({"pid": _dead_pid(), "host": host, "since": since}))
    manager = make_run(seed=0).manager(tmp_path)
    assert json.loads(marker.read_text())["pid"] == os.getpid()
    manager.close()
    assert not marker.exists()


# ------------------------------------------------------------------------ 2. flipped bytes


def _flip(path: Path, where: float) -> int:
    raw = bytearray(path.read_bytes())
    offset = min(len(raw) - 1, int(len(raw) * where))
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))
    return offset


@pytest.mark.parametrize("where", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_a_flipped_byte_in_a_data_file_is_found_and_names_the_fallback(tmp_path, where):
    weights = saved_run(tmp_path)
    newest = checkpoint_dir(tmp_path, 2)
    data = next(newest.glob("*.distcp"))
    _flip(data, where)

    fresh = make_run(seed=1)
    before = fresh.weights()
    with pytest.raises(CheckpointError) as raised:
        fresh.manager(tmp_path).load()
    assert_equal_tensors(fresh.weights(), before)  # all is checked before anything is copied
    message = str(raised.value)
    assert f"Checkpoint {newest} is damaged: its data file {data.name} does not match the checksum" in message
    assert "--checkpoint.load_step 1" in message and f"delete {newest}" in message
    # Each item is checked as it is read: loading only the weights finds a flip in them.
    if ", holding model." in message:
        with pytest.raises(CheckpointError, match="does not match the checksum"):
            load_model_state(str(newest), make_run(seed=1).parts[0].state_dict())
    else:
        load_model_state(str(newest), make_run(seed=1).parts[0].state_dict())

    previous = make_run(seed=1)
    assert previous.manager(tmp_path, load_step=1, newer_checkpoints="move_aside").load() == 1
    assert_equal_tensors(previous.weights(), weights[1])


def test_a_changed_metadata_or_lost_checksum_file_is_found_and_verify_false_skips(tmp_path):
    weights = saved_run(tmp_path)
    newest = checkpoint_dir(tmp_path, 2)
    metadata = newest / ".metadata"
    original = metadata.read_bytes()
    assert original.count(b"1.0.0") == 1  # DCP's version string: still unpickles when changed
    metadata.write_bytes(original.replace(b"1.0.0", b"1.0.1"))
    with pytest.raises(CheckpointError, match=r"its \.metadata file does not match the checksum"):
        make_run(seed=1).manager(tmp_path).load()
    metadata.write_bytes(original)

    manifest = newest / ".checksums.json"
    manifest.write_text(manifest.read_text()[:-5])
    with pytest.raises(CheckpointError, match=r"its checksum file \.checksums\.json cannot be read"):
        make_run(seed=1).manager(tmp_path).load()
    manifest.unlink()
    with pytest.raises(CheckpointError, match=r"its checksum file \.checksums\.json is missing"):
        make_run(seed=1).manager(tmp_path).load()
    unverified = make_run(seed=1)
    assert unverified.manager(tmp_path, verify=False).load() == 2
    assert_equal_tensors(unverified.weights(), weights[2])


# ------------------------------------------------------------------------ 3. another model or flavor


def test_a_checkpoint_of_a_larger_model_is_refused_unless_the_load_is_partial(tmp_path):
    bigger = make_run(seed=0, layer_ids=(0, 1, 2, 3))
    manager = bigger.manager(tmp_path)
    manager.save(1)
    manager.close()
    folder = checkpoint_dir(tmp_path, 1)
    lacks = r"it holds model\.layers\.3\.bias, model\.layers\.3\.weight, which this model lacks \(2 tensors\)"
    with pytest.raises(CheckpointError, match=rf"does not match this run: {lacks}"):
        make_run(seed=1).manager(tmp_path).load()
    smaller = make_run(seed=1).parts[0].state_dict()
    with pytest.raises(CheckpointError, match=lacks):
        load_model_state(str(folder), smaller)

    load_model_state(str(folder), smaller, partial=True)  # a pipeline stage loads its part
    expected = {k: v for k, v in bigger.weights().items() if not k.startswith("layers.3.")}
    assert_equal_tensors(smaller, expected)


def test_a_checkpoint_of_another_width_lists_every_differing_shape(tmp_path):
    saved_run(tmp_path, steps=(1,))
    with pytest.raises(CheckpointError) as raised:
        load_model_state(str(checkpoint_dir(tmp_path, 1)), make_run(seed=1, width=8).parts[0].state_dict())
    message = str(raised.value)
    assert "model.layers.0.weight has shape (6, 6) there but (8, 8) here" in message
    assert "model.layers.2.bias has shape (6,) there but (8,) here" in message


# ------------------------------------------------------------------------ 5. planted links


def test_a_planted_partial_link_is_removed_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = tmp_path / "checkpoint"
    saved_run(tmp_path, steps=(1,))
    (folder / "step-2.partial").symlink_to(outside, target_is_directory=True)
    (folder / "step-7").symlink_to(checkpoint_dir(tmp_path, 1), target_is_directory=True)
    assert list_checkpoints(str(folder)) == [1]  # a link named like a checkpoint is none

    run = make_run(seed=0)
    manager = run.manager(tmp_path)
    manager.save(2)
    manager.close()
    assert list(outside.iterdir()) == []
    assert not (folder / "step-2").is_symlink() and (folder / "step-2" / ".metadata").is_file()
    assert visible(folder) == ["step-1", "step-2", "step-7"]
    assert make_run(seed=1).manager(tmp_path).load() == 2


def test_a_linked_data_file_is_refused(tmp_path):
    saved_run(tmp_path, steps=(1,))
    folder = checkpoint_dir(tmp_path, 1)
    data = next(folder.glob("*.distcp"))
    moved = tmp_path / "elsewhere.distcp"
    data.rename(moved)
    data.symlink_to(moved)
    with pytest.raises(CheckpointError, match=rf"its data file {data.name} is a symbolic link"):
        make_run(seed=1).manager(tmp_path).load()


# ------------------------------------------------------------------------ 6. HF index traversal


@pytest.mark.parametrize("name", ["../x.safetensors", "/etc/passwd", "sub/../../x.safetensors", "C:\\x.safetensors"])
def test_an_hf_index_naming_a_file_outside_the_folder_is_refused(tmp_path, name):
    from plait.hf import _weight_files

    folder = tmp_path / "hf"
    folder.mkdir()
    (tmp_path / "x.safetensors").write_bytes(b"")
    index = {"weight_map": {"a": "model-1.safetensors", "b": name}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model-1.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="which lies outside"):
        _weight_files(folder)


# ------------------------------------------------------------------------ 7. pickle gadgets


def _s(text: str) -> bytes:
    raw = text.encode()
    return pickle.SHORT_BINUNICODE + bytes([len(raw)]) + raw


def _global(module: str, name: str) -> bytes:
    return _s(module) + _s(name) + pickle.STACK_GLOBAL


_P = pickle.PROTO + b"\x04"
_GADGETS = {
    # setattr(pathlib.PosixPath, "exists", None) through BUILD's slot state
    "build_on_allowed_class": (
        _P + _global("pathlib", "PosixPath") + pickle.NONE + pickle.EMPTY_DICT + _s("exists") + pickle.NONE
        + pickle.SETITEM + pickle.TUPLE2 + pickle.BUILD + pickle.STOP,
        r"setting the state of the class PosixPath",
    ),
    "build_unknown_field": (
        _P + _global("torch.distributed.checkpoint.metadata", "Metadata") + pickle.EMPTY_TUPLE + pickle.NEWOBJ
        + pickle.EMPTY_DICT + _s("__class__") + pickle.NONE + pickle.SETITEM + pickle.BUILD + pickle.STOP,
        r"setting attributes of Metadata that it does not have",
    ),
    "reduce_of_a_record_class": (
        _P + _global("torch.distributed.checkpoint.metadata", "Metadata") + pickle.EMPTY_DICT + pickle.TUPLE1
        + pickle.REDUCE + pickle.STOP,
        r"a call of the class Metadata",
    ),
    "global_os_system": (_P + _global("os", "system") + pickle.STOP, r"os\.system"),
    "global_builtins_eval": (_P + _global("builtins", "eval") + pickle.STOP, r"builtins\.eval"),
    "global_getattr": (_P + _global("builtins", "getattr") + pickle.STOP, r"builtins\.getattr"),
    "nested_attribute": (_P + _global("pathlib", "PosixPath.exists") + pickle.STOP, r"pathlib\.PosixPath\.exists"),
    "nested_module_attribute": (_P + _global("torch", "os.system") + pickle.STOP, r"torch\.os\.system"),
    "inst": (pickle.MARK + pickle.INST + b"collections\nOrderedDict\n" + pickle.STOP, r"operation INST"),
    "obj": (
        _P + pickle.MARK + _global("collections", "OrderedDict") + pickle.OBJ + pickle.STOP,
        r"operation OBJ",
    ),
    "newobj_ex": (
        _P + _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.EMPTY_DICT + pickle.NEWOBJ_EX
        + pickle.STOP,
        r"operation NEWOBJ_EX",
    ),
    "newobj_of_a_callable": (
        _P + _global("torch", "Size") + pickle.EMPTY_TUPLE + pickle.NEWOBJ + pickle.STOP,
        r"the creation of the class Size",
    ),
    "setitem_on_a_class": (
        _P + _global("collections", "OrderedDict") + _s("k") + pickle.NONE + pickle.SETITEM + pickle.STOP,
        r"adding items to the class OrderedDict",
    ),
    "extension_code": (_P + pickle.EXT1 + b"\x01" + pickle.STOP, r"operation EXT1"),
    "persistent_id": (_P + _s("x") + pickle.BINPERSID + pickle.STOP, r"operation BINPERSID"),
}


@pytest.mark.parametrize("gadget", sorted(_GADGETS))
def test_pickle_gadgets_in_the_metadata_are_refused_without_running(tmp_path, gadget):
    saved_run(tmp_path, steps=(1,))
    folder = checkpoint_dir(tmp_path, 1)
    payload, what = _GADGETS[gadget]
    (folder / ".metadata").write_bytes(payload)
    exists = pathlib.PosixPath.exists
    with pytest.raises(CheckpointError, match=rf"\.metadata file refers to .*{what}.*refused without running it"):
        make_run(seed=1).manager(tmp_path).load()
    with pytest.raises(CheckpointError, match="refused without running it"):
        load_model_state(str(folder), make_run(seed=1).parts[0].state_dict())
    assert pathlib.PosixPath.exists is exists and "exists" not in vars(pathlib.PosixPath)


# ------------------------------------------------------------------------ 8. oversized declared sizes


def _rewrite_metadata(folder: Path, change: Any) -> None:
    """Change the metadata (our own file: plain pickle is fine here) and, as an attacker
    could, record the new file's checksum."""
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    change(metadata)
    raw = pickle.dumps(metadata)
    (folder / ".metadata").write_bytes(raw)
    manifest = json.loads((folder / ".checksums.json").read_text())
    manifest["metadata"]["sha256"] = hashlib.sha256(raw).hexdigest()
    (folder / ".checksums.json").write_text(json.dumps(manifest))


def _grow_sparse(folder: Path, extra: int) -> tuple[str, int]:
    data = next(folder.glob("*.distcp"))
    size = data.stat().st_size
    os.truncate(data, size + extra)  # sparse: takes no disk space
    return data.name, size


def test_a_plain_state_declaring_64_gib_over_a_sparse_file_is_refused_before_allocating(tmp_path):
    saved_run(tmp_path, steps=(1,))
    folder = checkpoint_dir(tmp_path, 1)
    name, end = _grow_sparse(folder, 64 * GiB)

    def huge_record(metadata: Any) -> None:
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

        entry = metadata.state_dict_metadata["_plait.replicated"]
        entry.size = torch.Size([64 * GiB])
        entry.chunks = [ChunkStorageMetadata(offsets=torch.Size([0]), sizes=torch.Size([64 * GiB]))]
        metadata.storage_data[MetadataIndex("_plait.replicated", [0])] = _StorageInfo(name, end, 64 * GiB)

    _rewrite_metadata(folder, huge_record)
    with pytest.raises(CheckpointError, match=r"plain state entries declare 68719\d+ bytes, more than a run"):
        make_run(seed=1).manager(tmp_path, verify=False).load()


def test_a_chunk_declaring_more_bytes_than_its_shape_is_refused(tmp_path):
    saved_run(tmp_path, steps=(1,))
    folder = checkpoint_dir(tmp_path, 1)
    name, end = _grow_sparse(folder, 64 * GiB)

    def huge_item(metadata: Any) -> None:
        from torch.distributed.checkpoint.filesystem import _StorageInfo

        index = next(i for i in metadata.storage_data if i.fqn == "model.layers.0.weight")
        metadata.storage_data[index] = _StorageInfo(name, end, 64 * GiB)

    _rewrite_metadata(folder, huge_item)
    with pytest.raises(CheckpointError, match=r"declares 68719\d+ bytes for a chunk of model\.layers\.0\.weight"):
        make_run(seed=1).manager(tmp_path).load()


def test_items_beyond_the_file_or_overlapping_are_refused(tmp_path):
    saved_run(tmp_path, steps=(1,))
    folder = checkpoint_dir(tmp_path, 1)

    def overlap(metadata: Any) -> None:
        from torch.distributed.checkpoint.filesystem import _StorageInfo

        first, second = sorted(metadata.storage_data.items(), key=lambda item: item[1].offset)[:2]
        index, info = second
        metadata.storage_data[index] = _StorageInfo(info.relative_path, first[1].offset, info.length)

    _rewrite_metadata(folder, overlap)
    with pytest.raises(CheckpointError, match=r"declares overlapping data"):
        make_run(seed=1).manager(tmp_path).load()
