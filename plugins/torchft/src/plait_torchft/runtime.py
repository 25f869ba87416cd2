"""One replica group's side of a fault-tolerant run: torchft's manager, the quorum before
a step, the cross-group average, the commit vote, healing, accounting and events.

Synchronous mode, one step:

1. quorum (``Manager.start_quorum``): the lighthouse names the live groups; a group
   behind the others (a restarted one) fetches the live state from a peer here and the
   run continues from the peer's step (``ctx.step`` moves on);
2. the core's step runs: micro-batches, then ``plait_gradients_ready``, where gradients
   and the loss are averaged over the groups (one flat buffer per dtype), clipping,
   then ``optimizer.step()``, which asks for the commit vote and steps only on a yes;
3. a discarded step (a peer died during it) is undone (LR schedule) and retried on the
   same micro-batches: no batch is skipped or trained twice by a surviving group, and
   each step of the core's loop is exactly one committed step.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import socket
import time
from datetime import timedelta
from typing import Any
from urllib.parse import urlparse

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from plait.errors import ConfigError, PlaitError
from plait_torchft.config import TorchFTConfig
from plait_torchft.optimizer import CommitGatedOptimizer
from plait_torchft.semisync import SemiSync

logger = logging.getLogger("plait")

STATE_KEY = "torchft"
_MODES = ("sync", "local_sgd", "diloco")


def lighthouse_address(section: TorchFTConfig) -> str:
    address = section.lighthouse or os.environ.get("TORCHFT_LIGHTHOUSE", "")
    if not address:
        raise ConfigError("the torchft plugin needs the lighthouse's address: pass --torchft.lighthouse "
                          "http://HOST:PORT (or set TORCHFT_LIGHTHOUSE); start one with torchft_lighthouse "
                          "(plugins/torchft/README.md)")
    return address if "://" in address else f"http://{address}"


def check_lighthouse_reachable(address: str, timeout: float) -> None:
    parsed = urlparse(address)
    if parsed.hostname is None or parsed.port is None:
        raise ConfigError(f"--torchft.lighthouse {address!r} is not an address like http://HOST:PORT")
    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=timeout).close()
    except OSError as error:
        raise PlaitError(
            f"the torchft lighthouse at {address} did not answer within {timeout:g} s ({error}): start it first "
            "(torchft_lighthouse --min_replicas N, plugins/torchft/README.md) or fix --torchft.lighthouse"
        ) from None


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def weights_digest(params: list[torch.Tensor]) -> str:
    """A digest of the group's weights: each rank's local shards, joined over the ranks
    of the group (a collective inside the group). Equal digests at a step mean that the
    groups hold bit-identical weights; only one group writes checkpoints, so this is how
    the others are checked against it."""
    import hashlib

    digest = hashlib.sha256()
    for param in params:
        local = _local(param.detach()).contiguous().cpu().reshape(-1)
        digest.update(local.view(torch.uint8).numpy().tobytes())
    mine = digest.hexdigest()[:16]
    if not dist.is_initialized():
        return mine
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return "-".join(gathered)


class Counters:
    """What the group has done. Committed and discarded steps are checkpointed with the
    run (the commit vote is the same on every rank of a group); heals are counted per
    rank and not checkpointed, because torchft may heal each rank of a group from a
    different peer group (at the first step, every rank from its own source)."""

    def __init__(self) -> None:
        self.committed = 0
        self.discarded = 0
        self.heals = 0

    def state_dict(self) -> dict[str, Any]:
        return {"committed": self.committed, "discarded": self.discarded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.committed, self.discarded = int(state["committed"]), int(state["discarded"])


class FaultTolerance:
    def __init__(self, config: Any, device_type: str) -> None:
        self.section: TorchFTConfig = config.torchft
        self.dump_folder = config.job.dump_folder
        self.digest_interval = config.checkpoint.interval
        self.total_steps = config.training.steps
        self.device_type = device_type
        self.counters = Counters()
        self.manager: Any = None
        self.optimizer: CommitGatedOptimizer | None = None
        self.semisync: SemiSync | None = None
        self.checkpointer: Any = None
        self._store: Any = None
        self._quorums = 0
        self._healed_at: float | None = None
        self._states_at_step_start: dict[str, Any] | None = None
        self._vote: bool | None = None
        self._events: Any = None

    # ------------------------------------------------------------------ start

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model_parts: list[Any]) -> CommitGatedOptimizer:
        section = self.section
        address = lighthouse_address(section)
        check_lighthouse_reachable(address, section.connect_timeout_seconds)
        self.optimizer = CommitGatedOptimizer(optimizer)
        if section.mode != "sync":
            params = [p for part in model_parts for p in part.parameters() if p.requires_grad]
            self.semisync = SemiSync(params, mode=section.mode, sync_every=section.sync_every,
                                     fragments=section.fragments, outer_lr=section.outer_lr,
                                     outer_momentum=section.outer_momentum, outer_nesterov=section.outer_nesterov)
        self.manager = self._build_manager(address)
        return self.optimizer

    def _build_manager(self, address: str) -> Any:
        from torchft import Manager

        section = self.section
        if dist.is_initialized():  # the group's own store (torchrun's, or rank 0's from env://)
            rank, world = dist.get_rank(), dist.get_world_size()
            store_addr, store_port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        else:  # a group of one process: a store of its own
            rank, world = 0, 1
            self._store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
            store_addr, store_port = "127.0.0.1", self._store.port
        manager = Manager(
            pg=self._process_group(),
            load_state_dict=None,
            state_dict=None,
            min_replica_size=section.min_replicas,
            use_async_quorum=False,  # heal before the forward pass: a healed group trains this step
            timeout=timedelta(seconds=section.timeout_seconds),
            quorum_timeout=timedelta(seconds=section.quorum_timeout_seconds),
            connect_timeout=timedelta(seconds=section.connect_timeout_seconds),
            rank=rank,
            world_size=world,
            store_addr=store_addr,
            store_port=store_port,
            lighthouse_addr=address,
            replica_id=f"plait_group_{section.replica_group}",
            heartbeat_interval=timedelta(milliseconds=section.heartbeat_interval_ms),
        )
        manager.register_state_dict_fn("plait", self._load_live_state, self._live_state)
        return manager

    def _process_group(self) -> Any:
        backend = self.section.backend
        if backend == "auto":
            backend = "nccl" if self.device_type == "cuda" else "gloo"
        timeout = timedelta(seconds=self.section.timeout_seconds)
        if backend == "nccl":
            from torchft import ProcessGroupNCCL

            return ProcessGroupNCCL(timeout=timeout)
        from torchft import ProcessGroupGloo

        return ProcessGroupGloo(timeout=timeout)

    # ------------------------------------------------------------------ healing

    def _keep_states_at_step_start(self, ctx: Any) -> None:
        """A healing peer reads this group's state while the step runs on: after this group
        drew the step's batches (and on a retry of a discarded attempt, long after), before
        the step commits (torchft holds the weights until then). The plain states (data
        position, train state) are served as they were before the step's batches were drawn."""
        self._states_at_step_start = {name: copy.deepcopy(obj.state_dict())
                                      for name, obj in ctx.checkpointer.states.items() if name != STATE_KEY}

    def _live_state(self) -> dict[str, Any]:
        from plait_torchft.healing import live_state

        assert self.optimizer is not None and self.checkpointer is not None
        self._event("heal_served", step=self.checkpointer.states["train_state"].step + 1)
        return live_state(self.checkpointer, self.optimizer.inner, own_key=STATE_KEY, own_state=self._rank_state,
                          states=self._states_at_step_start)

    def _load_live_state(self, state: dict[str, Any]) -> None:
        from plait_torchft.healing import load_live_state

        assert self.optimizer is not None and self.checkpointer is not None
        load_live_state(self.checkpointer, self.optimizer.inner, state, own_key=STATE_KEY, load_own=self._load_rank_state)
        self._healed_at = time.perf_counter()

    def _rank_state(self) -> dict[str, Any]:
        return {"semisync": self.semisync.state_dict() if self.semisync is not None else None}

    def _load_rank_state(self, state: dict[str, Any]) -> None:
        if self.semisync is not None and state["semisync"] is not None:
            self.semisync.load_state_dict(state["semisync"])

    # ------------------------------------------------------------------ quorum

    def quorum(self, ctx: Any) -> None:
        """Join a quorum of the live groups before ``ctx.step``; heal from a peer if behind."""
        manager = self.manager
        # torchft's step is the number of finished steps: the group furthest on is healed from
        manager.load_state_dict({"step": ctx.step - 1, "batches_committed": manager.batches_committed()})
        started = time.perf_counter()
        self._healed_at = None
        try:
            manager.start_quorum(timeout=timedelta(seconds=self.section.quorum_timeout_seconds))
        except Exception as error:  # noqa: BLE001 - torchft raises plain RuntimeErrors
            raise PlaitError(
                f"replica group {self.section.replica_group}: no quorum of replica groups within "
                f"{self.section.quorum_timeout_seconds:g} s before step {ctx.step} ({str(error).splitlines()[0]}). "
                f"Is the lighthouse up, and are at least --torchft.min_replicas {self.section.min_replicas} groups "
                "running? Raise --torchft.quorum_timeout_seconds if steps are slow"
            ) from None
        self._quorums += 1
        participants = manager.num_participants()
        if participants > self.section.replica_groups:
            raise ConfigError(
                f"the quorum has {participants} replica groups but --torchft.replica_groups is "
                f"{self.section.replica_groups}: give every group's job the same, true number of groups"
            )
        if self._healed_at is not None:
            train_state = ctx.checkpointer.states["train_state"]
            seconds = self._healed_at - started
            self.counters.heals += 1
            logger.warning("replica group %d healed from a live peer in %.2f s: continuing at step %d (was %d)",
                           self.section.replica_group, seconds, train_state.step + 1, ctx.step)
            self._event("heal", step=train_state.step + 1, seconds=seconds, from_step=ctx.step)
            ctx.step = train_state.step + 1
            self._keep_states_at_step_start(ctx)
            ctx.results.setdefault("metrics", {})["ft/heal_seconds"] = seconds
        ctx.results.setdefault("metrics", {})["ft/quorum_size"] = float(participants)

    def _agreement(self) -> torch.Tensor:
        """The options every group must share, and their squares: averaged over the groups
        with the step's data, mean(v)² == mean(v²) holds only when all groups agree."""
        values = torch.tensor([self.section.replica_groups, self.section.min_replicas, _MODES.index(self.section.mode),
                               self.section.sync_every, self.section.fragments], dtype=torch.float32)
        return torch.cat([values, values**2])

    def _check_agreement(self, averaged: torch.Tensor) -> None:
        if self.manager.errored():
            return  # a peer failed meanwhile: the values are not usable, and the step is discarded
        names = ("replica_groups", "min_replicas", "mode", "sync_every", "fragments")
        means, squares = averaged[:len(names)], averaged[len(names):]
        differing = [name for name, m, q in zip(names, means, squares) if abs(float(q - m * m)) > 1e-3]
        if differing:
            ours = ", ".join(f"--torchft.{name} {getattr(self.section, name)}" for name in differing)
            raise ConfigError(
                f"the replica groups were started with different {', '.join('--torchft.' + n for n in differing)} "
                f"(this group: {ours}): start every group's job with the same torchft options"
            )

    # ------------------------------------------------------------------ synchronous step

    def train_step(self, ctx: Any) -> torch.Tensor:
        from plait.step import run_train_step

        self.checkpointer = ctx.checkpointer
        self._keep_states_at_step_start(ctx)
        source = ctx.batches
        batches: list[Any] | None = None
        for attempt in range(1, self.section.step_attempts + 1):
            first_step = ctx.step
            self.quorum(ctx)
            if batches is None or ctx.step != first_step:  # healed: the data position is the peer's
                batches = [next(source) for _ in range(ctx.grad_accumulation_steps)]
            ctx.batches = iter(batches)
            schedule = ctx.lr_scheduler.state_dict()
            assert self.optimizer is not None
            self._vote = None
            self.optimizer.gate = self._commit_vote
            try:
                loss = run_train_step(ctx)
            finally:
                self.optimizer.gate = None
            if self._vote is None:  # a plugin skipped optimizer.step(): vote all the same
                self._commit_vote()
            if self._vote:
                self.counters.committed += 1
                self._step_metrics(ctx)
                digest = {}
                if ctx.step % self.digest_interval == 0 or ctx.step == self.total_steps:
                    digest["weights"] = weights_digest([p for part in ctx.model_parts for p in part.parameters()])
                self._event("commit", step=ctx.step, participants=self.manager.num_participants(),
                            batch=self._batch_digest(batches), **digest)
                return loss
            self.counters.discarded += 1
            ctx.lr_scheduler.load_state_dict(schedule)
            for group, lr in zip(self.optimizer.param_groups, ctx.lr_scheduler.get_last_lr()):
                group["lr"] = lr
            reason = self.manager.errored()
            logger.warning("replica group %d: step %d discarded (attempt %d of %d): %s", self.section.replica_group,
                           ctx.step, attempt, self.section.step_attempts,
                           str(reason).splitlines()[0] if reason else "too few replica groups")
            self._event("discard", step=ctx.step, attempt=attempt)
        raise PlaitError(
            f"replica group {self.section.replica_group}: step {ctx.step} was discarded {self.section.step_attempts} "
            f"times in a row (last error: {self.manager.errored()}); fewer than --torchft.min_replicas "
            f"{self.section.min_replicas} groups may be alive. Checkpoints saved so far are intact"
        )

    @staticmethod
    def _batch_digest(batches: list[Any]) -> str:
        """Names the rows this rank trained in the step (its first micro-batch), for the
        event log: every step's rows can be checked against the data stream."""
        import hashlib

        inputs = batches[0][0]
        if not isinstance(inputs, torch.Tensor):
            return ""
        return hashlib.sha256(inputs.detach().cpu().numpy().tobytes()).hexdigest()[:16]

    def _commit_vote(self) -> bool:
        self._vote = bool(self.manager.should_commit(timeout=timedelta(seconds=self.section.timeout_seconds)))
        return self._vote

    def average_gradients(self, ctx: Any) -> None:
        """Gradients and the loss averaged over the groups, in place (sync mode): one
        flat buffer per dtype, one allreduce each."""
        loss = ctx.results["loss"].detach().float().reshape(1).clone()
        agreement = self._agreement()
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {torch.float32: [loss, agreement]}
        for part in ctx.model_parts:
            for param in part.parameters():
                if param.grad is not None:
                    grad = _local(param.grad)
                    by_dtype.setdefault(grad.dtype, []).append(grad)
        for tensors in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in tensors])
            self.manager.allreduce(flat).wait()
            offset = 0
            for tensor in tensors:
                tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()
        self._check_agreement(agreement)
        ctx.results["loss"] = loss.reshape(())

    # ------------------------------------------------------------------ semi-synchronous step

    def semisync_step(self, ctx: Any) -> torch.Tensor:
        from plait.step import run_train_step

        assert self.semisync is not None
        self.checkpointer = ctx.checkpointer
        self._keep_states_at_step_start(ctx)
        if self._quorums == 0 or ctx.step % self.semisync.sync_every in self.semisync.meeting_steps():
            self.quorum(ctx)
        loss = run_train_step(ctx)
        for fragment in self.semisync.due(ctx.step):
            applied = self.semisync.sync(fragment, self._average_in_place, self._commit_vote)
            if applied:
                self.counters.committed += 1
            else:
                self.counters.discarded += 1
                logger.warning("replica group %d: the synchronization of fragment %d at step %d was discarded; "
                               "this group keeps its own parameters until the next one",
                               self.section.replica_group, fragment, ctx.step)
            digest = {"weights": weights_digest(self.semisync.fragments[fragment])} if applied else {}
            self._event("sync" if applied else "discard", step=ctx.step, fragment=fragment, **digest)
        self._step_metrics(ctx)
        return loss

    def _average_in_place(self, tensors: list[torch.Tensor]) -> None:
        agreement = self._agreement()
        for tensor in [agreement, *tensors]:
            self.manager.allreduce(tensor).wait()
        self._check_agreement(agreement)

    # ------------------------------------------------------------------ accounting

    def _step_metrics(self, ctx: Any) -> None:
        ctx.results.setdefault("metrics", {}).update({
            "ft/committed": float(self.counters.committed),
            "ft/discarded": float(self.counters.discarded),
            "ft/heals": float(self.counters.heals),
        })

    def _event(self, kind: str, **fields: Any) -> None:
        """One JSON line per event in <dump_folder>/torchft_events.jsonl (rank 0 of the group)."""
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        if self._events is None:
            os.makedirs(self.dump_folder, exist_ok=True)
            self._events = open(os.path.join(self.dump_folder, "torchft_events.jsonl"), "a")
        self._events.write(json.dumps({"event": kind, "time": time.time(), **fields}) + "\n")
        self._events.flush()

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None
        if self.manager is not None:
            self.manager.shutdown(wait=False)
            self.manager = None
