"""plait-context-parallel: shards the sequence of every micro-batch over the cp ranks and
runs attention as ring attention (see README.md)."""
from plait_context_parallel.config import ContextParallelConfig

__all__ = ["ContextParallelConfig"]
