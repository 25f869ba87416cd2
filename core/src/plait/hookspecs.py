"""Every hook a plait plugin can implement, grouped by the stage of a run that calls it.

The core calls one hook per stage in a fixed order (the order of the banners below), so
the order in which plugins are registered never decides the semantics of a run. Within
one hook, pluggy calls implementations last-registered first; only hooks documented as
"collect-all" see several implementations, and their results never depend on that order
except where stated.

Calling conventions used below:

- **collect-all**: every implementation runs; the core receives the list of non-None
  results.
- **first result wins** (``firstresult=True``): implementations run until one returns
  something other than None; that value is used. Used for "who builds X".
- **replace or wrap** (``firstresult=True``, the core's own implementation ``trylast``):
  wrap the core's behaviour with ``@hookimpl(wrapper=True)`` (``result = yield``, then
  return it), e.g. fault tolerance or profiling around a step; or replace it with a plain
  implementation that returns a result. A plain implementation that returns None would let
  the core's work run after it, beside it by accident: the core refuses that with an error
  naming the plugin.

All hooks are called with keyword arguments; an implementation may accept any subset of
the documented parameters. Every hook name starts with ``plait_``; ``check_pending()``
runs after plugins load, so a misspelled implementation is an error.

A plugin module also declares these constants, read by the plugin manager:

- ``PLAIT_API_VERSION`` (int): the major hook-API version it was written for;
- ``PROVIDES`` (tuple of str): capabilities, e.g. ``("dp_shard", "dp_replicate")``,
  ``("tp",)``, ``("model:llama3",)``;
- ``REQUIRES`` (tuple of str): names of other plugins that must be enabled with it;
- ``DESCRIPTION`` (str): one line for ``plait plugins``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:  # only for annotations; keeps this module import-light
    import torch
    from torch import nn

    from plait.config import JobConfig
    from plait.job import Job
    from plait.model_spec import ModelSpec
    from plait.parallel_dims import ParallelDims
    from plait.train_state import DeviceInfo, PipelineResult, RunNeeds, StepContext

#: Major version of the hook API. A plugin declares the version it was built for
#: (module attribute ``PLAIT_API_VERSION``); another major version is refused at load.
PLUGIN_API_VERSION = 1

hookspec = pluggy.HookspecMarker("plait")
hookimpl = pluggy.HookimplMarker("plait")
"""Marks a plugin's hook implementations (re-exported as ``plait.hookimpl``)."""


# ---------------------------------------------------------------------------------------
# 1. Registration
# ---------------------------------------------------------------------------------------


@hookspec
def plait_register_models(register: Callable[[ModelSpec], None]) -> None:
    """Register model specs: call ``register(spec)`` once per model. collect-all.

    The plugin manager calls the hook once per enabled plugin (through pluggy, restricted
    to that plugin) with its own ``register``, so it knows who registered what: a name
    registered twice raises an error that names both plugins.
    """


@hookspec
def plait_add_config_sections(register: Callable[[str, type], None]) -> None:
    """Add this plugin's config section: ``register("float8", Float8Config)``.

    The section becomes ``--float8.<field>`` on the command line and ``config.float8`` in
    code. The class is a dataclass with defaults for every field; it may define
    ``validate(self) -> None`` raising ``ConfigError``. collect-all, called per plugin like
    ``plait_register_models``; a section name used twice is an error naming both plugins.
    """


# ---------------------------------------------------------------------------------------
# 2. Validation (before any process group, model or file exists)
# ---------------------------------------------------------------------------------------


@hookspec
def plait_run_needs(config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec) -> RunNeeds | None:
    """Declare what this plugin needs from the core for this run: a ``RunNeeds`` (how many
    parts it cuts each sequence into, whether it applies the compute dtype itself, whether
    compiled blocks must allow graph breaks, which device capabilities it requires), or
    None. A required capability the device lacks refuses the run before any work, naming
    the plugin, the device and the capability (docs/hardware.md). collect-all; the core combines the
    answers (``RunNeeds.combine``) and acts on them, so it never asks which plugin is on.
    """


@hookspec
def plait_validate(
    config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec, job: Job
) -> None:
    """Check this plugin's constraints; raise ``ConfigError`` with the fix. collect-all.

    ``job`` is the run resolved once (model args of this run, accumulation, combined
    needs, ``job.meta_model`` for checks that read the model's structure). Example: the tp
    plugin checks that ``tp`` divides the head counts of the model.
    """


# ---------------------------------------------------------------------------------------
# 3. Device
# ---------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def plait_device(config: JobConfig) -> DeviceInfo | None:
    """Return the device type, communication backend, peak FLOPs and capabilities
    (``plait.capabilities.Capabilities``) to use.

    first result wins. The core answers for cpu and NVIDIA GPUs; a vendor plugin (rocm)
    answers first for its hardware by returning a ``DeviceInfo``, and None elsewhere.
    Resolved once per run (``job.device``).
    """


# ---------------------------------------------------------------------------------------
# 4. Process groups and mesh
# ---------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def plait_init_process_group(config: JobConfig, device: DeviceInfo) -> bool | None:
    """Initialize ``torch.distributed`` yourself; return True if you did. first result wins.

    Without an implementation the core calls ``init_process_group`` with the device's
    backend when the world size is greater than one.
    """


@hookspec
def plait_mesh_built(parallel_dims: ParallelDims, config: JobConfig) -> None:
    """Observe (or extend) the meshes once ``ParallelDims.build_mesh`` ran. collect-all.

    torchft uses this to attach its fault-tolerant replicate group.
    """


# ---------------------------------------------------------------------------------------
# 5-6. Model construction (meta device) and conversion before sharding
# ---------------------------------------------------------------------------------------


@hookspec
def plait_convert_model(model: nn.Module, config: JobConfig, model_spec: ModelSpec) -> None:
    """Swap modules in place before any sharding (float8 / mxfp8 linears). collect-all.

    The model is on the meta device.
    """


# ---------------------------------------------------------------------------------------
# 7. Pipeline split
# ---------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def plait_pipeline_split(
    model: nn.Module,
    config: JobConfig,
    parallel_dims: ParallelDims,
    model_spec: ModelSpec,
    device: torch.device,
    job: Job,
) -> PipelineResult | None:
    """Cut the model into this rank's stages and build a schedule. first result wins.

    Without an implementation the whole model is one chunk.
    """


# ---------------------------------------------------------------------------------------
# 8. Per model chunk, in this order:
#    tensor parallel -> expert parallel -> context parallel
#    -> activation checkpointing (core) -> compile (core) -> data parallel
# ---------------------------------------------------------------------------------------


@hookspec
def plait_apply_tensor_parallel(
    model: nn.Module, config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec
) -> None:
    """Apply the model spec's TP/SP plan on ``parallel_dims.get_mesh("tp")``. collect-all."""


@hookspec
def plait_apply_expert_parallel(
    model: nn.Module, config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec
) -> None:
    """Shard experts over the ep mesh and install a token dispatcher. collect-all."""


@hookspec
def plait_apply_context_parallel(
    model: nn.Module, config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec
) -> None:
    """Prepare attention modules for context parallelism. collect-all."""


@hookspec
def plait_apply_data_parallel(
    model: nn.Module, config: JobConfig, parallel_dims: ParallelDims, model_spec: ModelSpec
) -> None:
    """Wrap the chunk for FSDP / HSDP / DDP (after AC and compile). collect-all."""


# ---------------------------------------------------------------------------------------
# 9. Materialize, initialize, optimizer
# ---------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def plait_wrap_optimizer(
    optimizer: torch.optim.Optimizer, model_parts: list[nn.Module], config: JobConfig
) -> torch.optim.Optimizer | None:
    """Return a replacement for the optimizer (e.g. torchft's). first result wins."""


# ---------------------------------------------------------------------------------------
# 10. Each step
# ---------------------------------------------------------------------------------------


@hookspec
def plait_train_context(config: JobConfig, parallel_dims: ParallelDims, ctx: StepContext) -> Any:
    """Return a context manager to enter around each micro-batch's forward and backward
    (context-parallel buffer sharding, loss parallel). collect-all; entered in the order of
    the returned list, exited in reverse."""


@hookspec(firstresult=True)
def plait_forward_backward(ctx: StepContext) -> torch.Tensor | None:
    """Run forward and backward for one micro-batch and return the (detached) loss.

    first result wins; the pipeline plugin replaces the core's forward/backward with its
    schedule here. Return None to leave it to the core.
    """


@hookspec(firstresult=True)
def plait_evaluate(ctx: StepContext) -> torch.Tensor | None:
    """Forward only, without gradients, of one validation batch (``ctx.inputs``,
    ``ctx.labels``), inside the ``plait_train_context`` contexts; return its mean loss,
    the same on every rank of the model (data-parallel ranks hold different batches).
    first result wins; the pipeline plugin runs its schedule's forward-only pass here.
    Return None to leave it to the core."""


@hookspec(firstresult=True)
def plait_train_step(ctx: StepContext) -> torch.Tensor | None:
    """One whole optimizer step (all micro-batches, clipping, optimizer step); returns the
    step's summed loss (also in ``ctx.results["loss"]``). replace or wrap: the core's
    implementation runs last; wrap it (``wrapper=True``) for fault tolerance, profiling
    or timing, or replace it by returning the loss yourself. A wrapper may set
    ``ctx.batches`` before it yields to feed the step micro-batches of its own
    (``grad_accumulation_steps`` of them, on the device): the rl experiment's rollouts."""


@hookspec
def plait_gradients_ready(ctx: StepContext) -> None:
    """The step's gradients are complete on this rank: every micro-batch ran forward and
    backward, and they are reduced over this job's data-parallel ranks; nothing was
    clipped yet. ``ctx.results["loss"]`` holds the step's loss. collect-all. Reduce them
    further here across ranks outside this job's mesh (torchft averages gradients and
    the loss over its replica groups, in place), so that clipping and the grad norm see
    the final gradients."""


@hookspec
def plait_before_optimizer_step(ctx: StepContext) -> None:
    """Called after gradients are final (clipped) and before ``optimizer.step()``. collect-all."""


@hookspec
def plait_after_optimizer_step(ctx: StepContext) -> None:
    """Called after ``optimizer.step()`` and the LR step (float8 scale precompute, torchft
    commit). collect-all."""


@hookspec
def plait_train_end(config: JobConfig, result: Any, error: BaseException | None) -> None:
    """Training ended on this rank: ``result`` (the ``TrainResult``) after the last step or
    a stop signal, or ``error`` when the run fails (the core raises it again once every
    implementation ran). collect-all, every rank. Release what the plugin holds here
    (files, connections, a logger's run), not in ``atexit`` handlers."""


@hookspec
def plait_log_metrics(step: int, metrics: dict[str, float], config: JobConfig) -> None:
    """Observe the metrics of a logged step (console and TensorBoard are core observers).
    collect-all."""


# ---------------------------------------------------------------------------------------
# 11. Checkpoint
# ---------------------------------------------------------------------------------------


@hookspec
def plait_checkpoint_state(config: JobConfig) -> dict[str, Any] | None:
    """Contribute extra stateful objects (``state_dict``/``load_state_dict``) to every
    checkpoint, keyed by a unique name. collect-all."""


@hookspec(firstresult=True)
def plait_checkpoint_save(checkpointer: Any, step: int, force: bool) -> bool | None:
    """Each checkpoint save point (after every step); returns whether a checkpoint was
    written. replace or wrap: the core's implementation (last) calls
    ``checkpointer.save(step, force=force)``, which saves on the interval, at the last step
    and on a stop signal."""


# ---------------------------------------------------------------------------------------
# 12. MoE token dispatch
# ---------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def plait_token_dispatcher(config: JobConfig, parallel_dims: ParallelDims) -> Any:
    """Return the token dispatcher MoE layers use (all-to-all from ep, DeepEP from deepep).
    first result wins; without one, MoE layers dispatch locally."""
