"""Saving and resuming a run: when to save, atomic visibility, async saves, resume.

What a checkpoint holds and how it is read back is in ``contents``; the folder layout in
``layout``; the safety of loading in ``safe_storage``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import warnings
import weakref
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from plait.checkpoint import layout
from plait.checkpoint import lock as run_lock
from plait.checkpoint.plain_state import fingerprint, join_tensors, json_to_tensor, split_tensors, tensor_refs
from plait.config import CheckpointSection
from plait.errors import CheckpointError, ConfigError, describe_os_error

logger = logging.getLogger(__name__)

# DCP warns on every single-process save and load, which is a normal way to run here.
warnings.filterwarnings(
    "ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized", category=UserWarning
)

_LR_SCHEDULER = "lr_scheduler"
#: a reader of a folder another job writes (and rotates) retries with the newest step this often
_RELOADS_AFTER_ROTATION = 5
_RESERVED_NAMES = frozenset({"model", "optimizer", _LR_SCHEDULER})
_STATE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


@dataclass(kw_only=True, slots=True)
class _PendingSave:
    step: int
    future: Future[Any]
    started: float
    published: bool = False


class CheckpointManager:
    """Saves every ``config.interval`` steps into ``<dump_folder>/<config.folder>/step-<N>``
    and resumes from the latest complete checkpoint (or ``config.load_step``).

    ``states`` are extra objects (dataloader, train state, plugin state) whose state
    dicts are plain data and tensors, identical on every rank; their tensors come back
    on the CPU. Every rank must create it and call ``load``, ``save``, ``wait`` and
    ``close`` at the same points; the checkpoint folder must be shared by all ranks.

    While it is open (checkpointing enabled) the run holds the lock of the checkpoint
    folder (``lock``): a second run on the same folder stops at once, naming this one.

    ``writes=False``: another job of the run writes this folder (``RunNeeds.writes_checkpoints``);
    this one resumes from it but never saves, locks, cleans or moves anything in it.
    """

    def __init__(
        self,
        config: CheckpointSection,
        *,
        dump_folder: str,
        model_parts: list[nn.Module],
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Stateful | None,
        states: dict[str, Stateful],
        writes: bool = True,
    ) -> None:
        for name in states:
            if name in _RESERVED_NAMES or not _STATE_NAME.fullmatch(name):
                raise ValueError(
                    f"checkpoint state name {name!r} must be a letter followed by letters, digits "
                    f"or underscores, and not one of {sorted(_RESERVED_NAMES)}"
                )
        self.config = config
        self.folder = os.path.join(dump_folder, config.folder)
        self.model_parts = list(model_parts)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.states = dict(states)
        self.writes = writes
        self._distributed = dist.is_available() and dist.is_initialized()
        self._rank = dist.get_rank() if self._distributed else 0
        # Async saves talk over their own gloo group: on the default group their
        # collectives would race the training step's.
        self._group = None
        if config.enable and config.async_mode == "async" and self._distributed:
            self._group = dist.new_group(backend="gloo")
        self._pending: _PendingSave | None = None
        self._last_step: int | None = None
        self._closed = False
        self._warned_space = False
        self._lock: run_lock.RunLock | None = None
        if config.enable and writes:
            self._lock = self._take_lock()
            # A manager dropped without close() (a test, an error path) lets go as well.
            weakref.finalize(self, self._lock.release)

    def _take_lock(self) -> run_lock.RunLock:
        """Rank 0 locks the folder; every rank learns the outcome from it."""
        held, refused = None, None
        if self._rank == 0:
            try:
                held = run_lock.acquire(self.folder)
            except (ConfigError, CheckpointError) as error:
                refused = error
        outcome = self._from_rank0(None if refused is None else (isinstance(refused, ConfigError), str(refused)))
        if refused is not None:
            raise refused
        if outcome is not None:
            is_config, message = outcome
            raise (ConfigError if is_config else CheckpointError)(message)
        return held if held is not None else run_lock.RunLock("")  # other ranks hold nothing

    # ---------------------------------------------------------------- resume

    def load(self) -> int:
        """Load the checkpoint to resume from; returns its step, or 0 when there is none."""
        if not self.config.enable:
            return 0
        if not self.writes and os.path.isdir(self.folder):
            # The job that writes this folder removes its oldest checkpoints as it saves:
            # import the reading code (DCP, about 1 s) before choosing a step, not between
            # choosing and reading it.
            from plait.checkpoint import contents  # noqa: F401
        available = self._from_rank0(layout.list_checkpoints(self.folder) if self._rank == 0 else None)
        requested = self.config.load_step
        if requested >= 0 and requested not in available:
            raise ConfigError(
                f"--checkpoint.load_step {requested}: there is no complete checkpoint of step "
                f"{requested} in {self.folder}; available steps: "
                f"{', '.join(map(str, available)) or 'none'}."
            )
        if requested < 0 and not available:
            return 0
        if requested >= 0:
            self._set_aside_newer(requested, [step for step in available if step > requested])
        step = requested if requested >= 0 else available[-1]
        started = time.monotonic()
        for attempt in range(_RELOADS_AFTER_ROTATION + 1):
            try:
                self._load(layout.step_dir(self.folder, step))
                break
            except CheckpointError:
                newest = self._newest_after_rotation(step) if requested < 0 else None
                if newest is None or attempt == _RELOADS_AFTER_ROTATION:
                    raise
                logger.warning("checkpoint step %d was removed while it loaded (the job that writes %s keeps "
                               "only its latest checkpoints); loading step %d", step, self.folder, newest)
                step = newest
        self._last_step = step
        logger.info("Resumed from checkpoint step %d in %.1f s", step, time.monotonic() - started)
        return step

    def _newest_after_rotation(self, step: int) -> int | None:
        """When another job writes this folder (``writes=False``) it may remove ``step`` as
        it saves newer ones while this one reads it: then the newest complete step, else
        None (the failure was something else). Each rank looks at the shared folder itself:
        a rank that failed cannot join a collective its peers are not in."""
        if self.writes or os.path.isdir(layout.step_dir(self.folder, step)):
            return None
        newer = [s for s in layout.list_checkpoints(self.folder) if s > step]
        return newer[-1] if newer else None

    def _set_aside_newer(self, requested: int, newer: list[int]) -> None:
        """Training on from an older step while newer checkpoints stay would leave two
        histories in one folder, and the next plain resume would pick the wrong one."""
        if not newer or not self.writes:  # the writing job sets them aside
            return
        listed = ", ".join(map(str, newer))
        if self.config.newer_checkpoints == "refuse":
            raise ConfigError(
                f"--checkpoint.load_step {requested}: {self.folder} also holds newer checkpoints "
                f"(steps {listed}); training on from step {requested} would mix two histories in "
                f"one folder. Add --checkpoint.newer_checkpoints move_aside to move them to "
                f"{os.path.join(self.folder, layout.SUPERSEDED)}/ (kept, never resumed from), "
                f"or leave out --checkpoint.load_step to resume from step {newer[-1]}."
            )
        if self._rank == 0:
            target = layout.move_aside(self.folder, newer)
            logger.warning("Moved the checkpoints of steps %s, newer than step %d, to %s", listed, requested, target)
        self._barrier()

    def _load(self, checkpoint_dir: str) -> None:
        from plait.checkpoint import contents
        from plait.checkpoint.model_state import model_state, optimizer_state, set_model_state, set_optimizer_state
        from plait.checkpoint.safe_storage import SafeFileSystemReader, load_tensors, mismatch

        reader = SafeFileSystemReader(checkpoint_dir, verify=self.config.verify)
        metadata = reader.read_metadata()
        model = model_state(self.model_parts)
        model_tensors = {f"{contents.MODEL_PREFIX}{fqn}": t for fqn, t in model.items()}
        limit = contents.plain_state_limit(model_tensors.values())
        records = contents.load_records(checkpoint_dir, reader, metadata, process_group=self._group, limit=limit)
        # Strict: the checkpoint holds this model's tensors and no others. Each rank (a
        # pipeline stage) may load a part; together they load the whole model.
        whole_model = {key for keys in self._all_gather(sorted(model_tensors)) for key in keys}
        contents.check_model(checkpoint_dir, metadata, model_tensors, whole_model=whole_model)
        replicated = contents.replicated_entries(checkpoint_dir, records.pop(contents.REPLICATED_KEY))
        saved_groups, saved_state = contents.merge_optimizer_records(checkpoint_dir, records.values())

        entries = {name: replicated.get(name) for name in self._replicated_names()}
        absent = [name for name, skeleton in entries.items() if skeleton is None]
        if absent:
            raise mismatch(
                checkpoint_dir, f"it holds no state {absent[0]!r} (it holds: {', '.join(sorted(replicated))})"
            )
        replicated_keys = [key for skeleton in entries.values() for key in tensor_refs(skeleton)]
        contents.check_declared_bytes(checkpoint_dir, metadata, replicated_keys, limit)
        replicated_tensors = {key: contents.allocate(checkpoint_dir, metadata, key) for key in replicated_keys}
        target_optimizer = optimizer_state(self.model_parts, self.optimizer)
        optimizer_tensors = split_tensors(target_optimizer, key_prefix="optimizer").tensors
        tensors = {
            **model_tensors,
            **optimizer_tensors,
            **replicated_tensors,
        }
        contents.check_against_metadata(checkpoint_dir, metadata, tensors)
        # Built before loading (it refers to the tensors that the load fills in place), so
        # that a mismatch is found before anything in this run has been overwritten.
        optimizer_to_apply = contents.optimizer_state_to_apply(
            checkpoint_dir, target_optimizer, saved_groups, saved_state, optimizer_tensors
        )
        load_tensors(checkpoint_dir, reader, tensors, process_group=self._group)

        set_model_state(self.model_parts, model)
        set_optimizer_state(self.model_parts, self.optimizer, optimizer_to_apply)
        for name, skeleton in entries.items():
            self._replicated_object(name).load_state_dict(join_tensors(skeleton, replicated_tensors))

    # ---------------------------------------------------------------- save

    def save(self, step: int, *, force: bool = False) -> bool:
        """Save at multiples of ``config.interval``, or now when ``force``; a no-op when
        checkpointing is disabled or ``step`` was just saved or loaded. Returns whether a
        save of ``step`` started (an async one may still be writing)."""
        if self._closed:
            raise RuntimeError("CheckpointManager.save() called after close()")
        if not self.config.enable or not self.writes:
            return False
        self._publish_if_done()
        if step == self._last_step or not (force or step % self.config.interval == 0):
            return False
        self.wait()
        self._refuse_non_finite(step)
        problem = None
        if self._rank == 0:
            try:
                os.makedirs(self.folder, exist_ok=True)
                layout.remove_leftovers(self.folder)
                problem = self._no_room_for(step)
                if problem is None:
                    layout.create_partial(layout.partial_dir(self.folder, step))  # exclusively
            except OSError as error:
                problem = (f"creating {layout.partial_dir(self.folder, step)} failed ({describe_os_error(error)}). "
                           f"The earlier checkpoints are intact. Check the permissions and free space of "
                           f"{self.folder}.")
        # Nobody writes into the folder before the leftovers are gone and it is created.
        problem = self._from_rank0(problem)
        if problem is not None:
            raise CheckpointError(f"Cannot start saving checkpoint step {step}: {problem}")
        started = time.monotonic()
        to_save = self._state_to_save()
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

        from plait.checkpoint.checksums import ChecksummingWriter

        writer = ChecksummingWriter(layout.partial_dir(self.folder, step))
        future: Future[Any]
        try:
            if self.config.async_mode == "async":
                response = dcp.async_save(
                    to_save, storage_writer=writer, process_group=self._group, no_dist=not self._distributed
                )
                future = response.upload_completion if isinstance(response, AsyncSaveResponse) else response
            else:
                future = Future()
                dcp.save(
                    to_save, storage_writer=writer, process_group=self._group, no_dist=not self._distributed
                )
                future.set_result(None)
        except (Exception, CheckpointException) as error:
            raise self._save_failed(step, error) from None
        self._pending = _PendingSave(step=step, future=future, started=started)
        self._last_step = step
        if self.config.async_mode != "async":
            self.wait()
        return True

    def _no_room_for(self, step: int) -> str | None:
        """Rank 0, before a save: None when the disk has room for the checkpoint (as large
        as the previous one, or at least this rank's share of the state), else why not. Warns
        once when the save after this one may not fit."""
        saved = layout.list_checkpoints(self.folder)
        if saved:
            expected = layout.checkpoint_bytes(layout.step_dir(self.folder, saved[-1]))
            basis = f"step {saved[-1]}'s size"
        else:
            expected, basis = self._local_state_bytes(), "this rank's share of the state"
        free = shutil.disk_usage(self.folder).free
        if free < expected:
            return (f"the disk is full: {_gib(free)} free in {self.folder}, and the checkpoint needs about "
                    f"{_gib(expected)} ({basis}). The earlier checkpoints are intact. Free space, lower "
                    "--checkpoint.keep_latest_k or move --checkpoint.folder to a larger disk, then resume with the "
                    "same command.")
        if free < 2 * expected and not self._warned_space:
            self._warned_space = True
            logger.warning(
                "The disk of %s has room for this checkpoint (about %s) but %s free may not hold the next one: "
                "free space, lower --checkpoint.keep_latest_k or move --checkpoint.folder to a larger disk",
                self.folder, _gib(expected), _gib(free))
        return None

    def _local_state_bytes(self) -> int:
        """The bytes of this rank's model and optimizer tensors (its shards, for a sharded model)."""
        tensors = [p for part in self.model_parts for p in part.parameters()]
        tensors += [t for state in self.optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
        local = (getattr(t, "_local_tensor", t) for t in tensors)
        return sum(t.numel() * t.element_size() for t in local)

    def _refuse_non_finite(self, step: int) -> None:
        """Never save weights that hold NaN or inf (a loss that is still finite can hide
        them: it was computed before the optimizer step that broke them). Every rank checks
        its shards; the answer is agreed so that all stop together."""
        from plait.errors import TrainingDivergedError

        local = [getattr(p, "_local_tensor", p).detach() for part in self.model_parts for p in part.parameters()]
        local = [t for t in local if t.numel()]
        norms = torch._foreach_norm(local) if local else []
        broken = torch.tensor([0.0 if not norms or bool(torch.isfinite(torch.stack(norms)).all()) else 1.0])
        if self._distributed:
            dist.all_reduce(broken, op=dist.ReduceOp.MAX, group=self._group)
        if broken.item():
            saved = layout.list_checkpoints(self.folder) if os.path.isdir(self.folder) else []
            last_good = f"step {saved[-1]} in {self.folder}" if saved else "none was saved yet"
            raise TrainingDivergedError(
                f"step {step}: the weights hold NaN or inf values, so no checkpoint was saved; the last good "
                f"checkpoint ({last_good}) is intact. Lower --optimizer.lr, raise --lr_scheduler.warmup_steps "
                "or lower --training.max_norm, or check the data, then resume."
            )

    def wait(self) -> None:
        """Block until the save in flight is written and visible (on every rank)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        from torch.distributed.checkpoint.api import CheckpointException  # imported by the save

        error: CheckpointError | None = None
        try:
            pending.future.result()
        except (Exception, CheckpointException) as failure:
            error = self._save_failed(pending.step, failure)
        else:
            if self._rank == 0 and not pending.published:
                try:
                    self._publish(pending)
                except OSError as failure:
                    error = CheckpointError(
                        f"Checkpoint step {pending.step} was written to "
                        f"{layout.partial_dir(self.folder, pending.step)} but could not be renamed to "
                        f"{layout.step_dir(self.folder, pending.step)}: {failure}. Check the folder's "
                        f"permissions and free space; the earlier checkpoints are intact."
                    )
        self._barrier()
        if error is not None:
            raise error

    def close(self) -> None:
        """Finish the save in flight, release the checkpoint process group and the
        checkpoint folder's lock."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            if self._group is not None:
                dist.destroy_process_group(self._group)
                self._group = None
            if self._lock is not None:
                self._lock.release()

    def _state_to_save(self) -> dict[str, torch.Tensor]:
        from plait.checkpoint import contents
        from plait.checkpoint.checksums import MARKER_KEY, marker_tensor
        from plait.checkpoint.model_state import model_state, optimizer_state

        to_save = {f"model.{fqn}": tensor for fqn, tensor in model_state(self.model_parts).items()}
        optimizer = split_tensors(optimizer_state(self.model_parts, self.optimizer), key_prefix="optimizer")
        to_save.update(optimizer.tensors)
        replicated = {
            name: split_tensors(self._replicated_object(name).state_dict(), key_prefix=name)
            for name in self._replicated_names()
        }
        for split in replicated.values():
            to_save.update(split.tensors)
        to_save[MARKER_KEY] = marker_tensor()
        to_save[contents.REPLICATED_KEY] = json_to_tensor(
            {
                "format": contents.FORMAT,
                "entries": {name: split.skeleton for name, split in replicated.items()},
            }
        )

        # One exchange of digests: replicated states must agree across ranks (DCP keeps
        # one copy), and ranks with the same optimizer record write it only once.
        optimizer_digest = hashlib.sha256(json.dumps(optimizer.skeleton, allow_nan=True).encode()).hexdigest()
        digests = self._all_gather(
            {
                "optimizer": optimizer_digest,
                **{name: fingerprint(split) for name, split in replicated.items()},
            }
        )
        for name in replicated:
            if len({d[name] for d in digests}) > 1:
                raise CheckpointError(
                    f"Cannot checkpoint state {name!r}: its state dict differs between ranks, but "
                    f"checkpointed states must be identical on every rank. Make its state_dict() "
                    f"return the same data everywhere (gather per-rank parts into it)."
                )
        if optimizer_digest not in [d["optimizer"] for d in digests[: self._rank]]:
            to_save[f"{contents.OPTIMIZER_RECORD_PREFIX}{self._rank}"] = json_to_tensor(optimizer.skeleton)
        return to_save

    def _publish_if_done(self) -> None:
        """Make a finished async save visible without waiting (rank 0, no collectives)."""
        pending = self._pending
        if pending is None or pending.published or not pending.future.done():
            return
        if pending.future.exception() is not None:
            return  # reported by wait()
        if self._rank == 0:
            try:
                self._publish(pending)
            except OSError:
                return  # retried and reported by wait()
        pending.published = True

    def _publish(self, pending: _PendingSave) -> None:
        layout.publish(
            layout.partial_dir(self.folder, pending.step), layout.step_dir(self.folder, pending.step)
        )
        pending.published = True
        layout.purge(self.folder, keep_latest_k=self.config.keep_latest_k, keep_step=pending.step)
        logger.info(
            "Saved checkpoint step %d to %s in %.1f s",
            pending.step,
            layout.step_dir(self.folder, pending.step),
            time.monotonic() - pending.started,
        )

    def _save_failed(self, step: int, error: BaseException) -> CheckpointError:
        from plait.checkpoint.safe_storage import describe, root_cause

        cause = root_cause(error)
        if isinstance(cause, CheckpointError):
            return cause
        if _disk_full(cause):
            free = shutil.disk_usage(self.folder).free if os.path.isdir(self.folder) else 0
            return CheckpointError(
                f"Saving checkpoint step {step} to {layout.partial_dir(self.folder, step)} failed because the disk "
                f"is full ({_gib(free)} free in {self.folder}; what failed: {describe(cause)}). The earlier "
                "checkpoints are intact; the unfinished folder is removed when the run starts again. Free space, lower "
                "--checkpoint.keep_latest_k or move --checkpoint.folder to a larger disk, then resume with the "
                "same command."
            )
        return CheckpointError(
            f"Saving checkpoint step {step} to {layout.partial_dir(self.folder, step)} failed "
            f"({describe(cause)}). The earlier checkpoints are intact; the unfinished folder is "
            f"ignored and removed at the next save. Check free space and permissions of {self.folder}."
        )

    # ---------------------------------------------------------------- helpers

    def _replicated_names(self) -> list[str]:
        return ([_LR_SCHEDULER] if self.lr_scheduler is not None else []) + list(self.states)

    def _replicated_object(self, name: str) -> Stateful:
        return self.lr_scheduler if name == _LR_SCHEDULER else self.states[name]  # type: ignore[return-value]

    def _barrier(self) -> None:
        if self._distributed:
            dist.barrier(group=self._group)

    def _all_gather(self, value: Any) -> list[Any]:
        if not self._distributed:
            return [value]
        gathered: list[Any] = [None] * dist.get_world_size(self._group)
        dist.all_gather_object(gathered, value, group=self._group)
        return gathered

    def _from_rank0(self, value: Any) -> Any:
        if not self._distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]


def _gib(size: int) -> str:
    return f"{size / 1024**3:.2f} GiB" if size >= 1024**3 else f"{size / 1024**2:.1f} MiB"


def _disk_full(error: BaseException) -> bool:
    """ENOSPC (or a full quota), also as torch's serializer reports a write it could not
    finish ("unexpected pos": the bytes written fell short, which is what a full disk does)."""
    import errno

    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(error, RuntimeError) and "unexpected pos" in str(error)
