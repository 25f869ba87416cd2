"""The ``rl`` plugin: ``plait train --plugins rl`` trains a policy on rollouts instead of text.

It changes plait's own training step through hooks, nothing else (docs/hook-reference.md):

- ``plait_add_config_sections``: the ``--rl.*`` options;
- ``plait_validate``: layouts and batch shapes the loop cannot run are refused before any work;
- ``plait_train_step`` (wrapper): before the core's step, the step's rollout (rank 0 receives
  it from the generators and broadcasts it), its advantages and loss weights become the
  step's micro-batches; after it, the new weights go to the generators as the next policy
  version, and the step's RL metrics join the console line and TensorBoard;
- ``plait_forward_backward``: the policy loss of one micro-batch (plait_rl.losses), backward;
- ``plait_train_end``: the generators stop.

Micro-batching, gradient accumulation, clipping, the optimizer, the LR schedule, FSDP/DDP,
checkpoints and metrics are the core's and the other plugins', unchanged.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from plait import hookimpl
from plait.errors import ConfigError

if TYPE_CHECKING:
    from plait.config import JobConfig
    from plait.job import Job
    from plait.model_spec import ModelSpec
    from plait.parallel_dims import ParallelDims
    from plait.train_state import StepContext
    from plait_rl.loop import RLRun

PLAIT_API_VERSION = 1
PROVIDES = ("trainer:rl",)
REQUIRES = ()
DESCRIPTION = "rl: GRPO / Dr.GRPO / DAPO on rollouts from generator processes running the trainer's model class"

_run: RLRun | None = None


@hookimpl
def plait_add_config_sections(register: Callable[[str, type], None]) -> None:
    from plait_rl.config import RLSection

    register("rl", RLSection)


@hookimpl
def plait_validate(config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec, job: Job) -> None:
    global _run
    from plait_rl.loop import RLRun, check_run

    check_run(config, parallel_dims, model_spec, job)
    if _run is not None:  # an earlier run in this process that did not end cleanly
        _run.close()
    _run = RLRun(job)


def _current() -> RLRun:
    if _run is None:
        raise ConfigError("the rl plugin was not set up for this run (plait_validate did not run)")
    return _run


@hookimpl(wrapper=True)
def plait_train_step(ctx: StepContext) -> Any:
    run = _current()
    run.before_step(ctx)
    loss = yield
    run.after_step(ctx)
    return loss


@hookimpl
def plait_forward_backward(ctx: StepContext) -> Any:
    return _current().forward_backward(ctx)


@hookimpl
def plait_train_end(config: JobConfig, result: Any, error: BaseException | None) -> None:
    global _run
    if _run is not None:
        _run.close()
        _run = None
