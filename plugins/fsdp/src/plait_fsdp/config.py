"""The ``fsdp`` config section (``--fsdp.<field>``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from plait.errors import ConfigError

ReshardAfterForward = Literal["default", "always", "never"]
ReduceDtype = Literal["float32", "bfloat16"]


@dataclass(kw_only=True, slots=True)
class FSDPConfig:
    reshard_after_forward: ReshardAfterForward = "default"
    """Free the gathered parameters of a block after its forward: "always" saves memory and
    gathers again in backward; "never" keeps them (no second all-gather); "default" does
    it for every block but not for the root, whose parameters backward needs first."""
    reduce_dtype: ReduceDtype = "float32"
    """Dtype of the gradient reduction. Parameters are gathered in --training.dtype
    (bfloat16 gives mixed precision); master weights and optimizer state stay float32."""
    cpu_offload: bool = False
    """Keep sharded parameters, gradients and optimizer state in CPU memory (the optimizer
    steps on the CPU); only meaningful with an accelerator."""

    def validate(self) -> None:
        if self.reshard_after_forward not in ("default", "always", "never"):
            raise ConfigError(
                f"--fsdp.reshard_after_forward must be default, always or never, got {self.reshard_after_forward!r}"
            )
        if self.reduce_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"--fsdp.reduce_dtype must be float32 or bfloat16, got {self.reduce_dtype!r}")
