"""The ``pipeline`` config section (``--pipeline.<field>``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from plait.errors import ConfigError

ScheduleName = Literal[
    "GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"
]
SCHEDULE_NAMES: tuple[str, ...] = get_args(ScheduleName)


@dataclass(kw_only=True, slots=True)
class PipelineConfig:
    schedule: ScheduleName = "1F1B"
    """Pipeline schedule: GPipe and 1F1B run one stage per rank; Interleaved1F1B, LoopedBFS
    and InterleavedZeroBubble loop over several stages per rank; ZBVZeroBubble and DualPipeV
    hold two stages per rank in a V (rank r: stages r and 2*pp-1-r)."""
    microbatches: int = 0
    """Pipeline microbatches per local batch; 0 = one per sequence (local_batch_size). Must
    divide --training.local_batch_size."""
    stages_per_rank: int = 0
    """Virtual stages per rank; 0 = from the schedule (1 for GPipe and 1F1B, 2 for the
    others), or from split_points / layers_per_stage when those are given."""
    layers_per_stage: int = 0
    """Blocks per stage (the first stage also holds what comes before the blocks, the last
    what comes after); 0 = the model spec's split points."""
    split_points: tuple[str, ...] = ()
    """Module paths that begin stages 1..N-1 (e.g. layers.2 layers.4); empty = the model
    spec's split points."""

    def validate(self) -> None:
        if self.schedule not in SCHEDULE_NAMES:
            raise ConfigError(
                f"--pipeline.schedule {self.schedule!r} is not a known schedule; choose one of: "
                + ", ".join(SCHEDULE_NAMES)
            )
        for name in ("microbatches", "stages_per_rank", "layers_per_stage"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--pipeline.{name} must be >= 0 (0 = automatic), got {getattr(self, name)}")
        if self.split_points and self.layers_per_stage:
            raise ConfigError(
                "--pipeline.split_points and --pipeline.layers_per_stage both say where stages begin: "
                "pass only one of them"
            )
