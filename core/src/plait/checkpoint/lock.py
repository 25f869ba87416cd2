"""One run at a time per checkpoint folder.

Two runs writing into one checkpoint folder destroy each other's work: the second
removes the first's unfinished save, and a published ``step-N`` can hold tensors of
both. A run therefore holds an exclusive lock on ``<checkpoint folder>/.lock`` from the
moment its ``CheckpointManager`` exists until ``close()``.

The lock is an ``flock`` on that file, which the kernel (or, on NFSv4 and Lustre with
``flock``, the file server) drops when the holding process dies: a lock left by a
killed run is never in the way, whatever its file still says. The file records the
holder (pid, host, start time) so that a refused run can name it. Where the file system
supports no ``flock`` at all, a marker file created exclusively takes its place; a
marker of a dead process on this host is taken over, one of another host cannot be
checked and must be deleted by hand (the message says so). See docs/checkpoints.md.

Within one process the lock is shared: several managers on one folder (a test, or a
run that resumes in-process) do not block each other.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from plait.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
_MARKER_SUFFIX = ".held"  # the fallback where flock is not supported
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_BUSY = {errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK}


@dataclass(kw_only=True, slots=True)
class _Held:
    fd: int
    marker: str | None
    count: int


_held: dict[str, _Held] = {}
_held_guard = threading.Lock()


class RunLock:
    """The lock of one checkpoint folder, held until :meth:`release`."""

    def __init__(self, key: str) -> None:
        self._key: str | None = key

    def release(self) -> None:
        key, self._key = self._key, None
        if key is None:
            return
        with _held_guard:
            held = _held.get(key)
            if held is None:
                return
            held.count -= 1
            if held.count > 0:
                return
            del _held[key]
        try:
            os.ftruncate(held.fd, 0)  # nobody holds it now
            if held.marker is not None:
                os.unlink(held.marker)
            else:
                fcntl.flock(held.fd, fcntl.LOCK_UN)
        except OSError as error:
            logger.warning("Could not release the checkpoint folder lock %s: %s", key, error)
        finally:
            os.close(held.fd)


def acquire(folder: str) -> RunLock:
    """Lock ``folder`` (created if needed) for this process, or raise ``ConfigError``
    naming the run that holds it."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise CheckpointError(
            f"Cannot create the checkpoint folder {folder}: {error}. Check its permissions, "
            f"or set --checkpoint.folder / --job.dump_folder to a writable place."
        ) from None
    path = os.path.join(os.path.realpath(folder), LOCK_FILE)
    with _held_guard:
        held = _held.get(path)
        if held is not None:
            held.count += 1
            return RunLock(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise CheckpointError(
                f"Cannot open the checkpoint folder lock {path}: {error}. Check the folder's "
                f"permissions; if {path} is a symbolic link, delete it."
            ) from None
        try:
            marker = _lock(fd, path)
            previous = _read_holder(fd)
            me = _me()
            _record_holder(fd, me)
        except BaseException:
            os.close(fd)
            raise
        if previous and (previous.get("pid"), previous.get("host")) != (me["pid"], me["host"]):
            logger.warning(
                "Took over the checkpoint folder lock %s left by %s, which no longer holds it",
                path,
                _describe(previous),
            )
        _held[path] = _Held(fd=fd, marker=marker, count=1)
    return RunLock(path)


def _record_holder(fd: int, me: dict[str, Any]) -> None:
    """Who holds the lock, for the message another run gets. The lock holds without it: on
    a full disk, the run goes on to free space (its start-up cleanup) rather than stop here."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
    except OSError as error:
        logger.warning("Could not record this run in the checkpoint folder lock: %s", error)


def _lock(fd: int, path: str) -> str | None:
    """Take the flock, or the marker file where flock is unsupported (returns its path)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except OSError as error:
        if error.errno in _BUSY:
            raise _in_use(path, _read_holder(fd)) from None
        if error.errno not in _UNSUPPORTED:
            raise CheckpointError(f"Cannot lock the checkpoint folder lock {path}: {error}") from None
    logger.warning("%s does not support flock; falling back to an exclusive marker file", path)
    marker = path + _MARKER_SUFFIX
    for _attempt in range(2):
        try:
            marker_fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            holder = _read_marker(marker)
            if holder and holder.get("host") == socket.gethostname() and not _alive(holder.get("pid")):
                logger.warning("Removing the stale lock marker %s of %s", marker, _describe(holder))
                try:
                    os.unlink(marker)
                except FileNotFoundError:
                    pass
                continue
            raise _in_use(path, holder, marker=marker) from None
        try:
            os.write(marker_fd, json.dumps(_me()).encode())
        finally:
            os.close(marker_fd)
        return marker
    raise _in_use(path, _read_marker(marker), marker=marker)


def _me() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime()),
    }


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        raw = os.pread(fd, 4096, 0)
        holder = json.loads(raw.decode()) if raw.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _read_marker(path: str) -> dict[str, Any] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _read_holder(fd)
    finally:
        os.close(fd)


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process (it has not recorded its pid yet)"
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')})"


def _in_use(path: str, holder: dict[str, Any] | None, *, marker: str | None = None) -> ConfigError:
    folder = os.path.dirname(path)
    message = (
        f"The checkpoint folder {folder} is in use by another run: {_describe(holder)}. Two runs "
        f"writing one checkpoint folder would destroy each other's checkpoints. Wait for that "
        f"run to end or stop it, or give this run its own --job.dump_folder or --checkpoint.folder."
    )
    if marker is not None:
        message += (
            f" (This file system has no flock: if that run is no longer running, delete {marker}.)"
        )
    return ConfigError(message)
