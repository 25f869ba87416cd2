"""The ``--wandb.*`` options. Import-light: wandb itself is not imported here."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from plait.errors import ConfigError

#: What W&B accepts in entity names.
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_FORBIDDEN_IN_PROJECT = set("/\\#?%:")


@dataclass(kw_only=True, slots=True)
class WandbConfig:
    project: str = "plait"
    """W&B project the run goes to (created on first use)."""
    entity: str = ""
    """W&B entity (user or team); empty: the default entity of your API key."""
    name: str = ""
    """Display name of the run; empty: the name of the run folder (--job.dump_folder)."""
    tags: tuple[str, ...] = ()
    """Tags of the run, e.g. --wandb.tags baseline llama3."""
    group: str = ""
    """Group the run belongs to; with --wandb.all_ranks, empty means the run's name, so
    the runs of all ranks form one group."""
    notes: str = ""
    """A longer description of the run."""
    mode: Literal["online", "offline", "disabled"] = "online"
    """online: send to the W&B server (needs `wandb login` or WANDB_API_KEY); offline:
    write under --wandb.dir only, `wandb sync` uploads later; disabled: log nothing."""
    dir: str = ""
    """Folder where wandb writes its files (wandb/<run>/...); empty: $WANDB_DIR, else the
    run folder (--job.dump_folder)."""
    all_ranks: bool = False
    """One W&B run per rank (grouped) instead of rank 0 only. Ranks other than 0 log what
    they hold locally: their own loss, gradient norm, learning rate and extra metrics."""

    def validate(self) -> None:
        if self.mode not in ("online", "offline", "disabled"):
            raise ConfigError(f"--wandb.mode must be online, offline or disabled, got {self.mode!r}")
        if not self.project.strip():
            raise ConfigError("--wandb.project must not be empty (the default is 'plait')")
        bad = sorted(_FORBIDDEN_IN_PROJECT & set(self.project))
        if bad or len(self.project) > 128:
            raise ConfigError(
                f"--wandb.project {self.project!r} is not a valid W&B project name: at most 128 "
                f"characters and none of {' '.join(sorted(_FORBIDDEN_IN_PROJECT))}"
            )
        if self.entity and not _NAME.fullmatch(self.entity):
            raise ConfigError(
                f"--wandb.entity {self.entity!r}: use letters, digits, '_', '-' and '.' only"
            )
        for tag in self.tags:
            if not tag.strip() or len(tag) > 64:
                raise ConfigError(f"--wandb.tags: each tag must be 1 to 64 characters, got {tag!r}")
