from __future__ import annotations

from dataclasses import dataclass

from plait.errors import ConfigError


@dataclass(kw_only=True, slots=True)
class DeepEPConfig:
    num_sms: int = 24
    """GPU streaming multiprocessors DeepEP's normal kernels may use (DeepEP's
    ``Buffer.set_num_sms``); the rest keep computing. Even, at least 2."""
    overlap_shared_experts: bool = True
    """Run the shared experts while the combine exchange is in flight."""

    def validate(self) -> None:
        if self.num_sms < 2 or self.num_sms % 2:
            raise ConfigError(f"--deepep.num_sms must be an even number >= 2, got {self.num_sms}")
