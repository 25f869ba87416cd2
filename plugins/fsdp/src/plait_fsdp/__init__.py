"""plait-fsdp: sharded (FSDP2), hybrid-sharded (HSDP) and replicated (DDP) data parallelism."""
from plait_fsdp.config import FSDPConfig

__all__ = ["FSDPConfig"]
