"""Faults injected into real runs: kill -9 at random points of a save, a full disk (a
small tmpfs where this machine allows one, else ENOSPC and short writes simulated), too
little free space to start a save. A resumed run is bit-exact with an uninterrupted one or
refuses cleanly; no checkpoint is lost or wrong. (Two runs on one folder, flipped bytes,
planted links, a non-finite learning rate, traversal and pickle gadgets are in
``test_checkpoint_faults`` and ``tests/test_cli_errors``.)"""
from __future__ import annotations

import errno
import io
import json
import logging
import os
import random
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from plait.checkpoint import list_checkpoints
from plait.checkpoint import manager as checkpoint_manager
from plait import hookimpl
from plait.errors import CheckpointError, PlaitError
from kill_during_save import job_config
from toy_model import ToyModelPlugin, train_toy

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

STEPS = 6
HERE = Path(__file__).parent
POINTS = ("timer", "mid_file", "before_data", "before_metadata", "before_manifest", "before_publish",
          "before_purge", "mid_delete")
SEEDS = range(len(POINTS))  # each point once, at a random save, tensor or time

Reference = namedtuple("Reference", "weights losses")


def weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for part in trainer.model_parts for k, v in part.state_dict().items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    """The uninterrupted run, saving at every step."""
    trainer, result = train_toy(job_config(str(tmp_path_factory.mktemp("reference")), STEPS), ToyModelPlugin())
    return Reference(weights(trainer), result.losses)


def _case(seed: int, folder: Path) -> dict:
    rng = random.Random(seed)
    point = POINTS[seed % len(POINTS)]
    save = rng.randint(1, 100) if point == "mid_file" else rng.randint(1, STEPS)
    if point == "mid_delete":
        save = rng.randint(1, STEPS - 2)  # deletions begin at the third save (keep_latest_k 2)
    return {"folder": str(folder), "steps": STEPS, "point": point, "save": save, "delay": rng.uniform(0.0, 1.5)}


def _leftovers(folder: Path) -> list[str]:
    """Unfinished saves and deletions (none when the run died before creating the folder)."""
    return [p.name for p in folder.iterdir() if p.name.endswith((".partial", ".deleting"))] if folder.is_dir() else []


def test_kill_9_at_random_points_of_saves_then_resume_is_bit_exact(reference, tmp_path):
    cases = [_case(seed, tmp_path / f"seed{seed}") for seed in SEEDS]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(HERE / "kill_during_save.py"), json.dumps(cases)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    statuses = json.loads(done.stdout.strip().splitlines()[-1])

    killed = mid_save = 0
    for case, status in zip(cases, statuses):
        folder = Path(case["folder"]) / "checkpoint"
        assert os.WIFSIGNALED(status) or os.WEXITSTATUS(status) == 0, (case, status)
        killed += os.WIFSIGNALED(status)
        mid_save += bool(_leftovers(folder))
        before = list_checkpoints(str(folder))

        trainer, resumed = train_toy(job_config(case["folder"], STEPS), ToyModelPlugin())
        assert trainer.resumed_from == (before[-1] if before else 0), case
        for name, tensor in weights(trainer).items():
            assert torch.equal(tensor, reference.weights[name]), (case, name)
        assert resumed.losses == {s: reference.losses[s] for s in range(trainer.resumed_from + 1, STEPS + 1)}, case
        assert not _leftovers(folder)
    # Most cases die, and most of those in the middle of a save (the rest between saves).
    print(f"{len(cases)} runs, {killed} killed, {mid_save} of them in the middle of a save; none lost or wrong")
    assert killed >= len(cases) - 2 and mid_save >= len(cases) // 2, (killed, mid_save)


# ------------------------------------------------------------------------ a full disk, simulated


class _FullStream(io.RawIOBase):
    """Takes ``room`` bytes, then fails with ENOSPC as a full disk does."""

    def __init__(self, room: int) -> None:
        self.room = room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return len(data)


@pytest.mark.parametrize("failure", ["enospc", "short_write"])
def test_a_disk_that_fills_during_a_save_says_so_and_the_run_resumes(reference, tmp_path, monkeypatch, failure):
    """ENOSPC from a write, and the short write torch's serializer reports as "unexpected
    pos", both read "the disk is full"; the earlier checkpoints stay, the unfinished folder
    goes at the next save, and the resumed run is exact."""
    original_save, original_manager_save = torch.save, checkpoint_manager.CheckpointManager.save
    saving = {"step": 0}

    def recording_step(self, step, **kwargs):
        saving["step"] = step
        return original_manager_save(self, step, **kwargs)

    def full_from_step_3(obj, stream, *args, **kwargs):
        if saving["step"] >= 3 and hasattr(stream, "write"):
            if failure == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            whole = io.BytesIO()
            original_save(obj, whole, *args, **kwargs)
            return original_save(obj, _FullStream(room=len(whole.getvalue()) // 2), *args, **kwargs)
        return original_save(obj, stream, *args, **kwargs)

    monkeypatch.setattr(checkpoint_manager.CheckpointManager, "save", recording_step)
    monkeypatch.setattr(torch, "save", full_from_step_3)
    with pytest.raises(CheckpointError) as raised:
        train_toy(job_config(str(tmp_path), STEPS), ToyModelPlugin())
    message = str(raised.value)
    assert message.startswith(f"Saving checkpoint step 3 to {tmp_path / 'checkpoint' / 'step-3.partial'} failed "
                              "because the disk is full (")
    assert "The earlier checkpoints are intact" in message and "--checkpoint.keep_latest_k" in message
    assert ("unexpected pos" if failure == "short_write" else "No space left on device") in message
    folder = tmp_path / "checkpoint"
    assert list_checkpoints(str(folder)) == [1, 2] and (folder / "step-3.partial").is_dir()

    monkeypatch.setattr(torch, "save", original_save)  # space was freed
    trainer, resumed = train_toy(job_config(str(tmp_path), STEPS), ToyModelPlugin())
    assert trainer.resumed_from == 2 and resumed.losses == {s: reference.losses[s] for s in range(3, STEPS + 1)}
    assert all(torch.equal(t, reference.weights[n]) for n, t in weights(trainer).items())
    assert not (folder / "step-3.partial").exists()


def test_too_little_free_space_refuses_a_save_before_writing_and_warns_early(reference, tmp_path, monkeypatch,
                                                                              caplog):
    usage = shutil.disk_usage(tmp_path)
    free = {"bytes": usage.free}
    monkeypatch.setattr(checkpoint_manager.shutil, "disk_usage",
                        lambda path: usage._replace(free=free["bytes"]))
    run = job_config(str(tmp_path), STEPS)
    run.training.steps = 1
    train_toy(run, ToyModelPlugin())
    size = sum(p.stat().st_size for p in (tmp_path / "checkpoint" / "step-1").iterdir())

    free["bytes"] = int(1.5 * size)  # room for one more, not two
    run.training.steps = 2
    with caplog.at_level(logging.WARNING, logger="plait.checkpoint.manager"):
        train_toy(run, ToyModelPlugin())
    assert "may not hold the next one" in caplog.text

    free["bytes"] = size // 2
    run.training.steps = 3
    with pytest.raises(CheckpointError) as raised:
        train_toy(run, ToyModelPlugin())
    message = str(raised.value)
    assert message.startswith("Cannot start saving checkpoint step 3: the disk is full:")
    assert "needs about" in message and "(step 2's size)" in message and "The earlier checkpoints are intact" in message
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == [".lock", "step-1", "step-2"]


# ------------------------------------------------------------------------ a full disk, for real


def _tmpfs_available() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


FULL_DISK_JOB = """
import os, sys
from plait.checkpoint.manager import CheckpointManager
from plait import hookimpl
from plait.errors import CheckpointError, PlaitError
from kill_during_save import job_config
from toy_model import ToyModelPlugin, train_toy
folder = sys.argv[1]
for check_first in (True, False):  # refused before writing; failing while writing
    if not check_first:
        CheckpointManager._no_room_for = lambda self, step: None
    try:
        train_toy(job_config(folder, 6), ToyModelPlugin())
    except CheckpointError as error:
        print("REFUSED", check_first, error)
    print("LEFT", sorted(os.listdir(os.path.join(folder, "checkpoint"))))
os.remove(os.path.join(folder, "filler"))  # the user frees space
trainer, result = train_toy(job_config(folder, 6), ToyModelPlugin())
print("RESUMED", trainer.resumed_from, result.last_step, sorted(os.listdir(os.path.join(folder, "checkpoint"))))
"""


@pytest.mark.skipif(not _tmpfs_available(), reason="needs `unshare -Urm` to mount a small tmpfs without root")
def test_a_real_full_disk_is_named_and_the_run_resumes_after_space_is_freed(tmp_path):
    """A 3 MiB tmpfs, mostly filled: the toy run's second checkpoint does not fit. It is
    refused before writing (free space checked), and, with that check off, the write that
    fails says "disk full" too; once space is freed the run resumes and finishes."""
    script = tmp_path / "job.py"
    script.write_text(FULL_DISK_JOB)
    mount = tmp_path / "disk"
    mount.mkdir()
    command = (f"mount -t tmpfs -o size=3m tmpfs {mount} && "
               f"head -c 1800000 /dev/zero > {mount}/filler && "
               f"exec {sys.executable} {script} {mount}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(["unshare", "-Urm", "sh", "-c", command], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    refused = [line for line in lines if line.startswith("REFUSED")]
    assert len(refused) == 2, done.stdout
    assert refused[0].startswith("REFUSED True Cannot start saving checkpoint step 2: the disk is full:")
    assert refused[1].startswith(f"REFUSED False Saving checkpoint step 2 to {mount}/checkpoint/step-2.partial "
                                 "failed because the disk is full")
    assert all("The earlier checkpoints are intact" in line for line in refused)
    resumed = next(line for line in lines if line.startswith("RESUMED")).split(" ", 3)
    assert resumed[1:3] == ["1", str(STEPS)] and ".partial" not in resumed[3], resumed


# ------------------------------------------------------------------------ out of memory


class _CpuAllocatorFails:
    """A step whose allocation fails the way torch's CPU allocator reports it."""

    PLAIT_API_VERSION = 1

    @hookimpl(tryfirst=True)
    def plait_train_step(self, ctx):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 400000000000 bytes. Error code 12 (Cannot allocate memory)")


def test_running_out_of_cpu_memory_in_a_step_is_a_message(tmp_path):
    with pytest.raises(PlaitError) as raised:
        train_toy(job_config(str(tmp_path), STEPS), ToyModelPlugin(), _CpuAllocatorFails())
    message = str(raised.value)
    assert message.startswith("step 1 ran out of cpu memory ([enforce fail")
    assert "Lower --training.local_batch_size" in message and "`plait plan` estimates" in message
