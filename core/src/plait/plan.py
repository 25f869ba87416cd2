"""``plait plan``: what a run needs on each rank, for any world size, from one process.

A fake process-group backend stands in for the other ranks, so the run's real code
builds its real meshes and parallelizes its real model (on the meta device) exactly as
it would on the cluster: an invalid layout fails here with the error it would give there.
Then the model is materialized as fake tensors (no memory) and one micro-batch runs
forward and backward under ``MemoryWatch``; collectives return garbage on fake tensors,
which only values, not shapes or memory, depend on.

One rank per pipeline stage is simulated (its first); data- and tensor-parallel ranks
are symmetric, up to the padding of uneven FSDP shards, which rank 0 carries.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from plait.job import Job
from plait.memory_watch import MemoryWatch
from plait.meta_init import materialize
from plait.model_spec import ModelSpec
from plait.parallel_dims import ParallelDims
from plait.step import forward_backward_micro_batch, run_loss_fn, train_contexts
from plait.train_state import PipelineResult, StepContext

#: Optimizer state tensors per parameter, each of the parameter's dtype.
OPTIMIZER_STATES_PER_PARAMETER = {"AdamW": 2}


@dataclass(kw_only=True)
class RankPlan:
    rank: int
    pp_rank: int
    parameters: int
    """Elements of the parameters this rank holds (its shards)."""
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    grad_accumulation_steps: int
    step_peak_bytes: int | None
    """Peak of everything else live during one micro-batch's forward and backward:
    activations, tensors saved for backward, gathered parameters, gradients as they are
    produced, temporaries. None when it could not be measured (see ``note``)."""
    all_gather_bytes: int = 0
    """Bytes this rank's all-gathers produce during one micro-batch's forward and backward
    (FSDP's parameter gathers, tensor parallelism's): the gathered tensors as they are
    sent, so float8 all-gather counts converted weights (FSDP) and activations (float8
    tensor parallelism) at 1 byte per element, plus their scales."""
    note: str = ""

    @property
    def peak_bytes(self) -> int | None:
        """Estimated peak per device in steady state (optimizer state already allocated;
        with gradient accumulation, the gradients of earlier micro-batches as well)."""
        if self.step_peak_bytes is None:
            return None
        held_gradients = self.gradient_bytes if self.grad_accumulation_steps > 1 else 0
        return self.parameter_bytes + self.optimizer_bytes + held_gradients + self.step_peak_bytes


@dataclass(kw_only=True)
class Plan:
    model: str
    flavor: str
    world_size: int
    layout: str
    meshes: dict[str, int]
    total_parameters: int
    seq_len: int
    local_batch_size: int
    grad_accumulation_steps: int
    tokens_per_step: int
    flops_per_token: float
    activation_checkpoint: str
    dtype: str
    ranks: list[RankPlan] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def flops_per_step(self) -> float:
        return self.flops_per_token * self.tokens_per_step

    def to_dict(self) -> dict[str, Any]:
        document = dataclasses.asdict(self)
        document["flops_per_step"] = self.flops_per_step
        for rank, data in zip(self.ranks, document["ranks"]):
            data["peak_bytes"] = rank.peak_bytes
        return document


def plan(job: Job, *, ranks: list[int] | None = None) -> Plan:
    """The plan of ``job`` (resolved for its world size); ``ranks`` defaults to the first
    rank of every pipeline stage."""
    start = time.perf_counter()
    config = copy.deepcopy(job.config)
    config.compile.enable = False  # compile fuses kernels; it does not change what is sharded
    job = dataclasses.replace(job, config=config)
    spec, model_args, parallel_dims = job.spec, job.model_args, job.parallel_dims
    world_size = parallel_dims.world_size
    total_parameters = sum(p.numel() for p in job.meta_model.parameters())
    accumulation = job.grad_accumulation_steps
    stage_size = world_size // parallel_dims.pp
    result = Plan(
        model=spec.name,
        flavor=config.model.flavor,
        world_size=world_size,
        layout=parallel_dims.describe(),
        meshes={},
        total_parameters=total_parameters,
        seq_len=job.tokens_per_sample,
        local_batch_size=config.training.local_batch_size,
        grad_accumulation_steps=accumulation,
        tokens_per_step=job.tokens_per_step,
        flops_per_token=spec.flops_per_token(model_args, job.tokens_per_sample),
        activation_checkpoint=config.activation_checkpoint.mode,
        dtype=config.training.dtype,
    )
    for rank in ranks if ranks is not None else [stage * stage_size for stage in range(parallel_dims.pp)]:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside the world of {world_size} ranks")
        rank_plan, result.meshes = _simulate_rank(rank, job)
        result.ranks.append(rank_plan)
    result.seconds = time.perf_counter() - start
    return result


def _simulate_rank(rank: int, job: Job) -> tuple[RankPlan, dict[str, int]]:
    """This rank's plan and the sizes of the meshes it built."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    if dist.is_initialized():
        raise RuntimeError("plait plan simulates ranks itself; run it without torchrun")
    config, manager = job.config, job.plugins
    world_size = job.parallel_dims.world_size
    parallel_dims = ParallelDims.from_config(config.parallelism, world_size)  # fresh meshes per simulated rank
    job = dataclasses.replace(job, parallel_dims=parallel_dims)
    if world_size > 1:
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        if world_size > 1:
            parallel_dims.build_mesh("cpu")
            manager.hook.plait_mesh_built(parallel_dims=parallel_dims, config=config)
        meshes = {name: parallel_dims.get_mesh(name).size() for name in parallel_dims.mesh_names()}
        parts, pipeline = job.build_model_parts(torch.device("cpu"))
        return _measure(rank, parts, pipeline, job), meshes
    finally:
        if world_size > 1:
            dist.destroy_process_group()
            _forget_meshes()


def _forget_meshes() -> None:
    """DTensor caches its sharding decisions by mesh layout, results holding the mesh they
    were made with; the next simulated rank has equal meshes over other process groups."""
    from torch.distributed.tensor import DTensor

    DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding.cache_clear()
    torch._C._clear_DTensor_sharding_propagator_cache()  # the C++ fast path's copy


def _measure(rank: int, parts: list[nn.Module], pipeline: PipelineResult | None, job: Job) -> RankPlan:
    from torch._subclasses.fake_tensor import FakeTensorMode

    config, spec, parallel_dims, model_args = job.config, job.spec, job.parallel_dims, job.model_args
    accumulation = job.grad_accumulation_steps

    pp_mesh = parallel_dims.get_optional_mesh("pp")
    with FakeTensorMode(allow_non_fake_inputs=True):
        for part in parts:
            materialize(part, "cpu")
            part.train()
        parameters = list({id(p): p for part in parts for p in part.parameters()}.values())
        local = [getattr(p, "_local_tensor", p) for p in parameters]
        parameter_bytes = sum(t.numel() * t.element_size() for t in local)
        gradient_bytes = sum(t.numel() * t.element_size() for t, p in zip(local, parameters) if p.requires_grad)
        states = OPTIMIZER_STATES_PER_PARAMETER.get(config.optimizer.name, 2)
        plan = RankPlan(
            rank=rank,
            pp_rank=pp_mesh.get_local_rank() if pp_mesh is not None else 0,
            parameters=sum(t.numel() for t in local),
            parameter_bytes=parameter_bytes,
            gradient_bytes=gradient_bytes,
            optimizer_bytes=states * gradient_bytes,
            grad_accumulation_steps=accumulation,
            step_peak_bytes=None,
        )
        if spec.data_pipeline is not None:
            plan.note = f"{spec.name} brings its own data pipeline; the step was not simulated"
            return plan
        ctx = StepContext(
            step=1, config=config, parallel_dims=parallel_dims, model_parts=parts, optimizer=None,
            lr_scheduler=None, loss_fn=run_loss_fn(job), grad_accumulation_steps=accumulation,
            needs=job.needs, hook=job.hook, pipeline=pipeline,
        )
        watch, gathers = MemoryWatch(), AllGatherBytes()
        with watch, gathers:
            watch.adopt([*parameters, *(b for part in parts for b in part.buffers())])
            before = watch.live_bytes
            watch.reset_peak()
            if pipeline is None:
                ctx.inputs, ctx.labels = _tokens(model_args, config.training.local_batch_size, config.training.seq_len)
                forward_backward_micro_batch(ctx)
            else:
                plan.note = _pipeline_step(ctx, pipeline, watch, spec, model_args)
        plan.step_peak_bytes = watch.peak_bytes - before
        plan.all_gather_bytes = gathers.bytes
        return plan


#: Operator namespaces of torch's collectives: c10d's in-place ones and the functional ones.
COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional", "_c10d_functional_autograd")


class AllGatherBytes(TorchDispatchMode):
    """Sums the bytes of the outputs of every all-gather run under it (c10d's in-place
    operators and the functional ones)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        result = func(*args, **(kwargs or {}))
        namespace, _, name = func.name().partition("::")
        if namespace in COLLECTIVE_NAMESPACES and ("all_gather" in name or "allgather" in name):
            gathered = args[0] if namespace == "c10d" else result  # c10d's operators write into args[0]
            self.bytes += sum(_payload_bytes(t) for t in _tensors(gathered))
        return result


def _payload_bytes(tensor: torch.Tensor) -> int:
    """A tensor subclass (a float8 tensor) counts the tensors it holds (1-byte data, scales),
    not its nominal dtype."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(_payload_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _tokens(model_args: Any, batch: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, getattr(model_args, "vocab_size", 2), (batch, seq_len + 1))
    return tokens[:, :-1], tokens[:, 1:]


def _pipeline_step(ctx: StepContext, pipeline: PipelineResult, watch: MemoryWatch, spec: ModelSpec,
                   model_args: Any) -> str:
    """The step peak of this rank's stages under the schedule, from two microbatches.

    A schedule cannot run on a fake process group (stages exchange shapes on the first
    step), so each stage runs here by itself: the forward of two microbatches, then their
    backwards. What the second forward adds is what each further microbatch in flight
    adds; the watch's peak is raised by it for the schedule's other in-flight microbatches.
    """
    config = ctx.config
    microbatch = max(1, config.training.local_batch_size // pipeline.microbatches)
    in_flight = pipeline.microbatches_in_flight or pipeline.microbatches
    runs = min(2, in_flight)
    held_per_microbatch = 0
    for part, stage in zip(ctx.model_parts, pipeline.stage_ids):
        outputs = []
        for index in range(runs):
            ctx.inputs, ctx.labels = _tokens(model_args, microbatch, config.training.seq_len)
            inputs = ctx.inputs if stage == 0 else _stage_input(ctx, spec, model_args, part)
            labels = ctx.labels
            with train_contexts(ctx):
                live = watch.live_bytes
                out = part(inputs)
                if stage == pipeline.num_stages - 1:
                    out = ctx.loss_fn(out, labels)
                if index == 1:
                    held_per_microbatch += watch.live_bytes - live
                outputs.append(out)
        with train_contexts(ctx):
            for out in outputs:
                out.backward(torch.ones_like(out))
        del outputs
    if in_flight > runs:
        watch.peak_bytes += (in_flight - runs) * held_per_microbatch
    return (f"pipeline: {pipeline.microbatches} microbatches of {microbatch} sequences, "
            f"{in_flight} in flight under the schedule; stages {pipeline.stage_ids} of {pipeline.num_stages}")


def _stage_input(ctx: StepContext, spec: ModelSpec, model_args: Any, part: nn.Module) -> torch.Tensor:
    """What a later stage receives: the input of its first block in the whole model,
    tensor- and context-parallel as the stage is (traced on fake tensors, stopped there)."""
    blocks = getattr(part, spec.block_container, None)
    names = [name for name, _ in blocks.named_children()] if blocks is not None else []
    if not names:
        raise RuntimeError(f"plait plan: a pipeline stage of {spec.name} holds no {spec.block_container}")
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():  # on the meta device: shapes only, no fake tensors, not watched
        shape, dtype = _traced_stage_input(ctx, spec, model_args, f"{spec.block_container}.{names[0]}")
    return torch.empty(shape, dtype=dtype)


def _traced_stage_input(ctx: StepContext, spec: ModelSpec, model_args: Any,
                        first_block: str) -> tuple[torch.Size, torch.dtype]:
    whole = spec.build_meta(model_args)
    common = dict(config=ctx.config, parallel_dims=ctx.parallel_dims, model_spec=spec)
    ctx.hook.plait_apply_tensor_parallel(model=whole, **common)
    ctx.hook.plait_apply_context_parallel(model=whole, **common)
    captured: list[torch.Tensor] = []

    class _Reached(Exception):
        pass

    def capture(module: nn.Module, args: tuple[Any, ...]) -> None:
        captured.append(args[0])
        raise _Reached

    whole.get_submodule(first_block).register_forward_pre_hook(capture)
    try:
        with torch.no_grad(), train_contexts(ctx):
            whole(torch.empty(ctx.inputs.shape, dtype=ctx.inputs.dtype, device="meta"))
    except _Reached:
        pass
    local = getattr(captured[0], "_local_tensor", captured[0])  # stages exchange plain tensors
    return local.shape, local.dtype


# --------------------------------------------------------------------------- report


def _size(nbytes: int | None) -> str:
    if nbytes is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.2f} {unit}"
    return f"{nbytes} B"


def format_plan(plan: Plan, *, device_memory_gib: float = 0.0) -> str:
    lines = [
        f"plait plan: {plan.model}/{plan.flavor} on {plan.world_size} ranks",
        f"  layout      {plan.layout}",
        "  meshes      " + (", ".join(f"{name} {size}" for name, size in plan.meshes.items()) or "none (one rank)"),
        f"  model       {plan.total_parameters:,} parameters; {plan.flops_per_token:.3g} FLOPs per token "
        f"(forward + backward)",
        f"  step        {plan.tokens_per_step:,} tokens (local batch {plan.local_batch_size} × seq {plan.seq_len}"
        f" × accumulation {plan.grad_accumulation_steps} × dp); {plan.flops_per_step:.3g} FLOPs, "
        f"{plan.flops_per_step / plan.world_size:.3g} per rank",
        f"  memory      {plan.dtype} compute, fp32 master weights, activation checkpointing "
        f"'{plan.activation_checkpoint}'; one micro-batch",
    ]
    for rank in plan.ranks:
        lines += [
            f"  rank {rank.rank} (pp rank {rank.pp_rank})      elements        memory",
            f"    parameters          {rank.parameters:>16,}  {_size(rank.parameter_bytes):>12}",
            f"    gradients           {'':>16}  {_size(rank.gradient_bytes):>12}",
            f"    optimizer state     {'':>16}  {_size(rank.optimizer_bytes):>12}",
            f"    step peak           {'':>16}  {_size(rank.step_peak_bytes):>12}   activations, saved tensors, "
            "gathered parameters, gradients and temporaries of one micro-batch",
            f"    estimated peak      {'':>16}  {_size(rank.peak_bytes):>12}",
            f"    all-gathered        {'':>16}  {_size(rank.all_gather_bytes):>12}   per micro-batch, in the "
            "dtypes gathered (float8: 1 byte per element, plus scales)",
        ]
        if rank.note:
            lines.append(f"    note: {rank.note}")
        if device_memory_gib and rank.peak_bytes is not None:
            fits = rank.peak_bytes <= device_memory_gib * 2**30
            lines.append(f"    fits in {device_memory_gib:g} GiB: {'yes' if fits else 'NO'}")
    lines.append(f"  planned in {plan.seconds:.1f} s")
    return "\n".join(lines)
