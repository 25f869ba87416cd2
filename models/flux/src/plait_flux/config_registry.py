"""Named recipes for flux (entry-point group ``plait.recipes``): ``--config <name>``."""
from __future__ import annotations

from plait.config import JobConfig
from plait.recipes import recipe


def flux_debug() -> JobConfig:
    """flux-debug on the embedded shapes dataset: the loss falls within a minute on a CPU."""
    config = recipe("flux", "flux-debug", "flux debug model on the embedded shapes dataset (CPU friendly)")
    config.training.steps = 60
    config.training.local_batch_size = 16
    config.optimizer.lr = 1e-3
    config.optimizer.implementation = "fused"
    config.lr_scheduler.warmup_steps = 5
    config.checkpoint.interval = 30
    config.data.held_out_share = 0.05
    config.validation.interval = 20
    config.validation.steps = 2
    # Captions of the embedded dataset, drawn with --training.sample_interval N.
    config.training.sample_prompts = ("a red circle at the top left", "a blue square at the centre",
                                      "a yellow triangle at the bottom right")
    return config
