"""Checkpointing: DCP folders that reshard across layouts, appear atomically, survive
damage to newer ones, and never unpickle anything but tensor data when loaded.

    mgr = CheckpointManager(config.checkpoint, dump_folder=..., model_parts=[model],
                            optimizer=opt, lr_scheduler=sched, states={"train_state": ts})
    start = mgr.load()        # 0 when there is nothing to resume from
    for step in range(start + 1, steps + 1):
        ...
        mgr.save(step, force=step == steps)
    mgr.close()
"""

from typing import Any

from plait.checkpoint.layout import list_checkpoints
from plait.checkpoint.manager import CheckpointManager, Stateful

__all__ = ["CheckpointManager", "Stateful", "list_checkpoints", "load_model_state"]


def __getattr__(name: str) -> Any:
    # torch.distributed.checkpoint takes 0.6 s and 50 MiB to import: a run imports it with
    # its first save or load, not at its start.
    if name == "load_model_state":
        from plait.checkpoint.contents import load_model_state

        return load_model_state
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
