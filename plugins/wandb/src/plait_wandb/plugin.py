"""Plugin module: light at import; wandb is imported only when a W&B run opens.

Moments of a run (docs/hook-reference.md):
- ``plait_validate``: bad ``--wandb.*`` options, or online mode without credentials, are
  refused before any work; the enabled plugins are noted for the run config;
- ``plait_checkpoint_state``: a fresh ``WandbRun`` per training run, whose id goes into
  every checkpoint (a resumed run reopens the same W&B run);
- ``plait_log_metrics`` (rank 0): the first call opens the W&B run with the run config,
  every call logs the step's metrics;
- ``plait_train_step`` (wrapper): with ``--wandb.all_ranks``, the other ranks log what
  they hold locally;
- ``plait_train_end``: training ended (last step, stop signal or error) finishes the W&B
  run, with exit code 1 after an error.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from plait import hookimpl
from plait.errors import ConfigError

if TYPE_CHECKING:
    from plait.config import JobConfig
    from plait.job import Job
    from plait_wandb.run import WandbRun

PLAIT_API_VERSION = 1
PROVIDES = ("logger:wandb",)
REQUIRES = ()
DESCRIPTION = "wandb: log metrics and the run config to Weights & Biases (resumes the same W&B run)"

#: The training run of this process (one at a time), and the plugins its job enabled.
_current: WandbRun | None = None
_enabled_plugins: list[str] = []


@hookimpl
def plait_add_config_sections(register: Callable[[str, type], None]) -> None:
    from plait_wandb.config import WandbConfig

    register("wandb", WandbConfig)


def check_options(config: JobConfig) -> None:
    """Refuse options that cannot work, with the fix (also what ``plait_validate`` runs)."""
    section = config.wandb
    section.validate()
    if section.mode != "online":
        return
    from plait_wandb.credentials import api_key_configured, base_url

    if not api_key_configured():
        raise ConfigError(
            f"--wandb.mode online needs a W&B API key for {base_url()}, and none is configured: "
            "run `wandb login` (or set WANDB_API_KEY), or log locally with --wandb.mode offline "
            "(upload later with `wandb sync`), or drop wandb from --plugins"
        )


@hookimpl
def plait_validate(config: JobConfig, job: Job) -> None:
    global _enabled_plugins
    check_options(config)
    _enabled_plugins = list(job.plugins.enabled)


@hookimpl
def plait_checkpoint_state(config: JobConfig) -> dict[str, Any]:
    global _current
    from plait_wandb.run import WandbRun, rank_and_world

    if _current is not None:  # an earlier run in this process that ended without its last save
        _current.finish(exit_code=1)
    rank, world_size = rank_and_world()
    _current = WandbRun(config, plugins=_enabled_plugins, rank=rank, world_size=world_size)
    return {"wandb": _current}


@hookimpl
def plait_log_metrics(step: int, metrics: dict[str, float], config: JobConfig) -> None:
    if _current is not None:
        _current.log(step, metrics)


@hookimpl(wrapper=True)
def plait_train_step(ctx: Any) -> Any:
    lr = ctx.lr_scheduler.get_last_lr()[0]  # the step's LR (the step advances the schedule)
    # A step that raises is not the end of the W&B run (a fault-tolerance wrapper around
    # this one may retry it); plait_train_end finishes the run when training ends.
    loss = yield
    run = _current
    if run is not None and run.rank != 0 and run.section.all_ranks:
        log_freq = ctx.config.metrics.log_freq
        if ctx.step % log_freq == 0 or ctx.step == ctx.config.training.steps:
            run.log(ctx.step, _local_metrics(ctx, loss, lr))
    return loss


def _local_metrics(ctx: Any, loss: Any, lr: float) -> dict[str, float]:
    """What a rank other than 0 knows of its step without a collective: its own loss
    (none on pipeline stages before the last), gradient norm, LR and extra metrics."""
    metrics = {"lr": float(lr)}
    if loss is not None:
        metrics["loss"] = float(loss)
    grad_norm = ctx.results.get("grad_norm")
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    for key, value in (ctx.results.get("metrics") or {}).items():
        metrics[key] = float(value)
    return metrics


@hookimpl
def plait_train_end(config: JobConfig, result: Any, error: BaseException | None) -> None:
    """The W&B run ends with the training: exit code 0 after the last step or a stop
    signal, 1 when the run failed."""
    global _current
    if _current is not None:
        _current.finish(exit_code=0 if error is None else 1)
        _current = None
