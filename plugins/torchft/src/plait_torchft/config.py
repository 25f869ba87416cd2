"""The ``torchft`` config section (``--torchft.<field>``) and its checks.

Timeouts, shortest first; each must be shorter than the next (checked at start):

1. ``heartbeat_interval_ms``: how often a group tells the lighthouse it is alive. The
   lighthouse's ``--heartbeat_timeout_ms`` (torchft_lighthouse, default 5000) must be
   several intervals: a group silent that long is dropped from the next quorum, which is
   how long the survivors pause after a group dies.
2. ``connect_timeout_seconds``: opening a connection to the lighthouse or a group's manager.
3. ``timeout_seconds``: one cross-group operation (gradient average, commit vote, the
   transfer of a healing state). A dead peer fails the step after at most this long.
4. ``quorum_timeout_seconds``: waiting for a quorum, which waits for the slowest group to
   finish its step (including its failed operations, 3) and for the lighthouse to drop
   dead groups (1). For LocalSGD and DiLoCo it must cover ``sync_every`` steps.
5. ``--job.pg_timeout_seconds``: collectives inside a group (FSDP, TP). One rank may sit
   in one while another rank of its group waits for a quorum (4), so it is the longest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from plait.errors import ConfigError

Mode = Literal["sync", "local_sgd", "diloco"]
Backend = Literal["auto", "gloo", "nccl"]


@dataclass(kw_only=True, slots=True)
class TorchFTConfig:
    lighthouse: str = ""
    """Address of the lighthouse, e.g. http://host:29510 (empty: $TORCHFT_LIGHTHOUSE)."""
    replica_group: int = 0
    """This job's replica group, 0 .. replica_groups - 1 (each group is its own torchrun job)."""
    replica_groups: int = 1
    """How many replica groups the whole run has: each global batch is sharded over all
    of them. A group that is down leaves its shard of the batch untrained."""
    min_replicas: int = 1
    """Fewest groups that may commit a step; below it every step is discarded until
    enough groups are back. 1 lets a lone survivor keep training."""
    backend: Backend = "auto"
    """Process group between the groups: gloo or nccl; auto follows the device."""
    mode: Mode = "sync"
    """sync: gradients averaged over the groups every step (fault-tolerant HSDP);
    local_sgd: parameters averaged every sync_every steps; diloco: an outer optimizer
    step on the averaged parameter change every sync_every steps."""
    sync_every: int = 1
    """Steps between synchronizations (local_sgd, diloco); 1 in sync mode."""
    fragments: int = 1
    """diloco/local_sgd: the model is split into this many parameter fragments, each
    synchronized at its own step within the sync_every steps (spreads communication)."""
    outer_lr: float = 0.7
    """diloco: learning rate of the outer Nesterov SGD."""
    outer_momentum: float = 0.9
    """diloco: momentum of the outer SGD."""
    outer_nesterov: bool = True
    """diloco: Nesterov momentum for the outer SGD."""
    timeout_seconds: float = 60.0
    """One cross-group operation: gradient average, commit vote, healing transfer."""
    quorum_timeout_seconds: float = 120.0
    """Waiting for a quorum of groups."""
    connect_timeout_seconds: float = 10.0
    """Connecting to the lighthouse and to a group's manager."""
    heartbeat_interval_ms: int = 100
    """How often each group heartbeats to the lighthouse."""
    step_attempts: int = 5
    """Attempts of one step (each discarded attempt is retried on the same batch) before
    the run stops with the last error."""

    def validate(self) -> None:
        if self.replica_groups < 1:
            raise ConfigError(f"--torchft.replica_groups must be >= 1, got {self.replica_groups}")
        if not 0 <= self.replica_group < self.replica_groups:
            raise ConfigError(
                f"--torchft.replica_group {self.replica_group} is not one of the {self.replica_groups} groups: "
                f"give each group's job an index 0 .. {self.replica_groups - 1} (and the same --torchft.replica_groups)"
            )
        if not 1 <= self.min_replicas <= self.replica_groups:
            raise ConfigError(
                f"--torchft.min_replicas must be between 1 and --torchft.replica_groups {self.replica_groups}, "
                f"got {self.min_replicas}"
            )
        if self.mode not in ("sync", "local_sgd", "diloco"):
            raise ConfigError(f"--torchft.mode must be sync, local_sgd or diloco, got {self.mode!r}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(f"--torchft.backend must be auto, gloo or nccl, got {self.backend!r}")
        if self.sync_every < 1 or self.fragments < 1 or self.step_attempts < 1:
            raise ConfigError("--torchft.sync_every, --torchft.fragments and --torchft.step_attempts must be >= 1")
        if self.mode == "sync" and (self.sync_every != 1 or self.fragments != 1):
            raise ConfigError(
                "--torchft.sync_every and --torchft.fragments apply to --torchft.mode local_sgd or diloco; "
                "sync mode averages every step: drop them or choose a semi-synchronous mode"
            )
        if self.sync_every % self.fragments:
            raise ConfigError(
                f"--torchft.fragments {self.fragments} must divide --torchft.sync_every {self.sync_every}: "
                "each fragment synchronizes at its own step of the interval"
            )
        if not (self.outer_lr > 0 and 0 <= self.outer_momentum < 1):
            raise ConfigError("--torchft.outer_lr must be > 0 and --torchft.outer_momentum in [0, 1)")
        if self.heartbeat_interval_ms <= 0:
            raise ConfigError(f"--torchft.heartbeat_interval_ms must be > 0, got {self.heartbeat_interval_ms}")
        for name in ("connect_timeout_seconds", "timeout_seconds", "quorum_timeout_seconds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--torchft.{name} must be > 0, got {getattr(self, name)}")

    def check_timeouts(self, pg_timeout_seconds: float) -> None:
        """The hierarchy in the module's docstring, shortest first."""
        chain = [
            ("--torchft.heartbeat_interval_ms / 1000", self.heartbeat_interval_ms / 1000),
            ("--torchft.connect_timeout_seconds", self.connect_timeout_seconds),
            ("--torchft.timeout_seconds", self.timeout_seconds),
            ("--torchft.quorum_timeout_seconds", self.quorum_timeout_seconds),
            ("--job.pg_timeout_seconds", pg_timeout_seconds),
        ]
        for (short_name, short), (long_name, long) in zip(chain, chain[1:]):
            if short >= long:
                raise ConfigError(
                    f"timeouts in the wrong order: {short_name} ({short:g}) must be shorter than {long_name} "
                    f"({long:g}). Each waits for the one before it: heartbeat < connect < cross-group operation "
                    "< quorum < collectives inside a group (plugins/torchft/README.md, Timeouts)"
                )
