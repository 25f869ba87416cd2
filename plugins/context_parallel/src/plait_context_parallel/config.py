"""The ``context_parallel`` config section (``--context_parallel.<field>``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from plait.errors import ConfigError

RotateMethod = Literal["allgather", "alltoall"]
ROTATE_METHODS: tuple[str, ...] = get_args(RotateMethod)


@dataclass(kw_only=True, slots=True)
class ContextParallelConfig:
    rotate_method: RotateMethod = "allgather"
    """How ring attention passes key/value shards between the cp ranks: "allgather" gathers
    them all once after the first local block (one collective, cp × the K/V memory);
    "alltoall" sends each shard to the next rank at every ring step (cp - 1 collectives,
    the memory of two shards)."""

    def validate(self) -> None:
        if self.rotate_method not in ROTATE_METHODS:
            raise ConfigError(
                f"--context_parallel.rotate_method must be one of {', '.join(ROTATE_METHODS)}, "
                f"got {self.rotate_method!r}"
            )
