"""The checkpoint folder and how a checkpoint becomes visible or goes away.

``<root>/step-<N>/`` is a complete checkpoint. It is written as ``step-<N>.partial``
and renamed once every rank finished, so a crash leaves nothing that looks complete.
Deleting goes the other way: rename to ``step-<N>.deleting`` first, then remove, so a
half-deleted folder is never taken for a checkpoint. Leftovers of either kind are
removed before the next save. Only the coordinating rank (rank 0) changes the folder;
the folder must be shared by all ranks.

Nothing in the folder is followed if it is a symbolic link: a link named like a
checkpoint is not one, a link left as an unfinished folder is removed (never the folder
it points to), and an unfinished folder is created exclusively before a save writes
into it. (The checkpoint folder itself may be a link, to another disk say.)
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time

logger = logging.getLogger(__name__)

_COMPLETE = re.compile(r"step-(\d+)")
SUPERSEDED = "superseded"
_LEFTOVER = re.compile(r"step-\d+\.(partial|deleting)")


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step}")


def partial_dir(root: str, step: int) -> str:
    return step_dir(root, step) + ".partial"


def step_of(checkpoint_dir: str) -> int | None:
    """The step of a ``step-<N>`` folder, None for any other name."""
    match = _COMPLETE.fullmatch(os.path.basename(os.path.normpath(checkpoint_dir)))
    return int(match.group(1)) if match else None


def list_checkpoints(folder: str) -> list[int]:
    """The steps of the complete checkpoints in ``folder``, ascending."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    steps = []
    for entry in entries:
        match = _COMPLETE.fullmatch(entry.name)
        if match and entry.is_dir(follow_symlinks=False):
            steps.append(int(match.group(1)))
    return sorted(steps)


def move_aside(root: str, steps: list[int]) -> str:
    """Move the checkpoints of ``steps`` into ``<root>/superseded/<UTC time>/`` (kept, but
    no longer a checkpoint of this folder); returns that folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = os.path.join(root, SUPERSEDED, stamp)
    suffix = 1
    while os.path.lexists(target):
        suffix += 1
        target = os.path.join(root, SUPERSEDED, f"{stamp}-{suffix}")
    os.makedirs(target)
    for step in steps:
        os.rename(step_dir(root, step), step_dir(target, step))
    _sync_folder(root)
    return target


def checkpoint_bytes(checkpoint_dir: str) -> int:
    """The bytes of a checkpoint's files (links are not followed)."""
    total = 0
    for folder, _, files in os.walk(checkpoint_dir):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def remove_leftovers(root: str) -> None:
    """Remove partial and half-deleted checkpoints left by an earlier crash."""
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return
    for entry in entries:
        if _LEFTOVER.fullmatch(entry.name):
            logger.info("Removing unfinished checkpoint folder %s", entry.path)
            _remove(entry.path)


def create_partial(partial: str) -> None:
    """Create the unfinished folder of a save; fails if anything of that name exists."""
    os.mkdir(partial)


def publish(partial: str, final: str) -> None:
    """Make a finished checkpoint visible, replacing an older one of the same step."""
    if os.path.islink(partial) or not os.path.isdir(partial):
        raise OSError(f"{partial} is not a folder this run created (a symbolic link?)")
    if os.path.lexists(final):
        _delete(final)
    os.rename(partial, final)
    _sync_folder(os.path.dirname(final))  # make the rename itself durable


def purge(root: str, *, keep_latest_k: int, keep_step: int) -> None:
    """Delete the oldest complete checkpoints so that ``keep_latest_k`` remain
    (0 keeps all). ``keep_step``, the one just saved, is never deleted."""
    if keep_latest_k <= 0:
        return
    steps = list_checkpoints(root)
    older = [step for step in steps if step != keep_step]
    for step in older[: max(0, len(steps) - keep_latest_k)]:
        try:
            _delete(step_dir(root, step))
        except OSError as error:
            logger.warning("Could not delete old checkpoint %s: %s", step_dir(root, step), error)


def _delete(checkpoint_dir: str) -> None:
    if os.path.islink(checkpoint_dir):
        os.unlink(checkpoint_dir)  # never what it points to
        return
    doomed = checkpoint_dir + ".deleting"
    if os.path.lexists(doomed):
        _remove(doomed, ignore_errors=False)
    os.rename(checkpoint_dir, doomed)
    shutil.rmtree(doomed)


def _remove(path: str, *, ignore_errors: bool = True) -> None:
    """Remove a folder, or only the link when ``path`` is a symbolic link."""
    try:
        if os.path.islink(path) or not os.path.isdir(path):
            os.unlink(path)
        else:
            shutil.rmtree(path)
    except OSError:
        if not ignore_errors:
            raise


def _sync_folder(path: str) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some filesystems cannot sync a folder; the rename is still atomic
    finally:
        os.close(descriptor)
