"""The W&B run of one training run: its id (kept in every checkpoint, so a resumed run
continues the same W&B run), opened at the first logged step and finished at the last
save point. wandb is imported only when a run opens."""
from __future__ import annotations

import logging
import os
import secrets
import string
from typing import Any

logger = logging.getLogger("plait")

_ID_CHARS = string.ascii_lowercase + string.digits


def new_run_id() -> str:
    """A fresh W&B run id (8 characters of [a-z0-9], like ``wandb.util.generate_id``)."""
    return "".join(secrets.choice(_ID_CHARS) for _ in range(8))


def shared_run_id() -> str:
    """A fresh run id, the same on every rank: checkpointed states must be identical on
    every rank, so rank 0's id is sent to the others (one collective, at set-up)."""
    import torch.distributed as dist

    run_id = new_run_id()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [run_id]
        dist.broadcast_object_list(box, src=0)
        run_id = box[0]
    return run_id


def rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class WandbRun:
    """Checkpointed as ``{"run_id": ...}`` (the same on every rank); opens the W&B run
    lazily, so that a resumed checkpoint's id is known by then."""

    def __init__(self, config: Any, *, plugins: list[str], rank: int, world_size: int) -> None:
        self.config = config
        self.section = config.wandb
        self.plugins = list(plugins)
        self.rank = rank
        self.world_size = world_size
        self.run_id = shared_run_id()
        self.resumed = False
        self.run: Any = None
        self.finished = False

    # -- checkpoint state ---------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.run is not None:
            raise RuntimeError("the W&B run id was loaded after the run had started")
        self.run_id = str(state["run_id"])
        self.resumed = True

    # -- logging ------------------------------------------------------------------------

    @property
    def logs_here(self) -> bool:
        return self.rank == 0 or self.section.all_ranks

    def base_name(self) -> str:
        """--wandb.name, else the run folder's name."""
        return self.section.name or os.path.basename(os.path.abspath(self.config.job.dump_folder)) or "plait"

    def name(self) -> str:
        return f"{self.base_name()}-rank{self.rank}" if self.section.all_ranks else self.base_name()

    def rank_run_id(self) -> str:
        return self.run_id if self.rank == 0 else f"{self.run_id}-rank{self.rank}"

    def start(self) -> Any:
        if self.run is not None or self.finished:
            return self.run
        import wandb

        section, job = self.section, self.config.job
        folder = section.dir or os.environ.get("WANDB_DIR") or job.dump_folder
        os.makedirs(folder, exist_ok=True)
        group = section.group or (self.base_name() if section.all_ranks else "")
        run_config = {"plugins": self.plugins, **self.config.to_dict()}
        if section.all_ranks:
            run_config["rank"] = self.rank
        self.run = wandb.init(
            project=section.project,
            entity=section.entity or None,
            name=self.name(),
            tags=list(section.tags) or None,
            group=group or None,
            notes=section.notes or None,
            mode=section.mode,
            dir=folder,
            id=self.rank_run_id(),
            resume="allow",
            config=run_config,
            # An explicit run: no global wandb.run for other code to write into by accident.
            reinit="create_new",
        )
        logger.info("W&B run %s (%s, %s)%s", self.rank_run_id(), section.project, section.mode,
                    ", resumed" if self.resumed else "")
        return self.run

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.finished or not self.logs_here:
            return
        from plait.metrics import TENSORBOARD_NAMES  # the same scalar names as TensorBoard

        run = self.start()
        run.log({TENSORBOARD_NAMES.get(key, key): float(value) for key, value in metrics.items()}, step=step)

    def finish(self, *, exit_code: int = 0) -> None:
        """Close the W&B run (flushes and, online, uploads); later logs are dropped."""
        self.finished = True
        run, self.run = self.run, None
        if run is not None:
            run.finish(exit_code=exit_code)
