"""One optimizer step: micro-batches with gradient accumulation inside the plugins'
contexts, forward and backward (or a plugin's, such as a pipeline schedule), clipping,
the optimizer and the LR schedule. The core's ``plait_train_step`` runs it."""
from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from plait.data.batch import call_model
from plait.dtensors import full_tensor, is_dtensor
from plait.errors import PluginError
from plait.nn.loss import cross_entropy
from plait.train_state import StepContext

if TYPE_CHECKING:
    from plait.job import Job


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, vocabulary: int | None = None) -> torch.Tensor:
    """The mean fp32 cross-entropy of logits ``[B, S, V]`` against labels ``[B, S]``, with
    ids ``>= vocabulary`` (columns that pad the model's vocabulary past the tokenizer's)
    out of the softmax: in chunks of rows (``plait.nn.loss``), without fp32 copies of the
    logits. Vocabulary-sharded DTensor logits (tp's loss parallelism) take
    ``F.cross_entropy``, which that parallelism implements."""
    if is_dtensor(logits):
        logits = logits if vocabulary is None else mask_padded_logits(logits, vocabulary)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
    return cross_entropy(logits.flatten(0, 1), labels.flatten(), vocabulary=vocabulary)


def run_loss_fn(job: Job) -> Callable[..., torch.Tensor]:
    """The loss of ``job`` (trainer, validation and ``plait plan`` alike): the model spec's
    own, else the token cross-entropy; where the model's vocabulary is padded past the
    tokenizer's, the padded ids are out of the softmax (they get no gradient)."""
    spec, tokenizer = job.spec, job.tokenizer
    model_vocabulary = getattr(job.model_args, spec.vocab_arg or "", None)
    vocabulary = None
    if tokenizer is not None and model_vocabulary is not None and tokenizer.vocab_size < model_vocabulary:
        vocabulary = tokenizer.vocab_size
    if spec.loss_fn is None:
        return functools.partial(token_cross_entropy, vocabulary=vocabulary)
    return spec.loss_fn if vocabulary is None else without_padded_vocabulary(spec.loss_fn, vocabulary)


def without_padded_vocabulary(loss_fn: Callable[..., torch.Tensor], vocabulary: int) -> Callable[..., torch.Tensor]:
    """A model's own ``loss_fn`` with the logits of ids ``>= vocabulary`` at -inf: out of
    the softmax, so they get no gradient (``token_cross_entropy`` leaves them out itself)."""

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return loss_fn(mask_padded_logits(logits, vocabulary), labels)

    return loss


def mask_padded_logits(logits: torch.Tensor, vocabulary: int) -> torch.Tensor:
    """``logits`` (``[..., model vocabulary]``) with ids ``>= vocabulary`` set to -inf; a
    vocabulary-sharded DTensor (tp's loss parallelism) masks each rank's own columns."""
    if logits.shape[-1] <= vocabulary:
        return logits
    if not is_dtensor(logits):
        ids = torch.arange(logits.shape[-1], device=logits.device)
        return logits.masked_fill(ids >= vocabulary, float("-inf"))
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.utils._python_dispatch import _disable_current_modes

    local = logits.to_local()
    with _disable_current_modes():  # plain integers, also under ``plait plan``'s fake tensors
        _, offset = compute_local_shape_and_global_offset(logits.shape, logits.device_mesh, logits.placements)
    ids = torch.arange(local.shape[-1], device=local.device) + offset[-1]
    local = local.masked_fill(ids >= vocabulary, float("-inf"))
    return DTensor.from_local(local, logits.device_mesh, logits.placements, shape=logits.shape, stride=logits.stride())


def clip_grad_norm_(
    parameters: list[nn.Parameter], max_norm: float, pp_mesh: Any = None
) -> torch.Tensor:
    """Total L2 norm of all gradients (over shards and pipeline stages); clips if max_norm > 0."""
    # DTensors on different meshes (experts under ep) cannot mix in one foreach op: group them.
    by_mesh: dict[Any, list[nn.Parameter]] = {}
    for param in parameters:
        if param.grad is not None:
            by_mesh.setdefault(getattr(param.grad, "device_mesh", None), []).append(param)
    norms = [_full_norm([p.grad for p in group]) for group in by_mesh.values()] or [_full_norm([])]
    total = norms[0] if len(norms) == 1 else torch.stack(norms).norm()
    if pp_mesh is not None:
        total = total**2
        dist.all_reduce(total, group=pp_mesh.get_group())
        total = total**0.5
    if max_norm > 0:
        for group in by_mesh.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=True)
    return total


def _full_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of ``grads`` (whole, over their shards), accumulated in float64: a
    float32 reduction over millions of elements is off in the fifth digit, so the norm, and
    the clipping it drives, would depend on how the gradients are sharded."""
    if not grads:
        return torch.zeros(())
    if grads[0].device.type == "cpu" and not is_dtensor(grads[0]):
        # float32 norms of rows (short sums, exact to ~1e-7), combined in float64: as exact
        # as casting every gradient to float64, without a float64 copy of all of them
        # (at 100M parameters that copy was 10 % of a CPU step). Elsewhere the foreach
        # kernel below accumulates in float64 without copies, in a few launches where this
        # loop would launch four kernels per gradient.
        squares = [torch.linalg.vector_norm(grad.reshape(-1, grad.shape[-1]) if grad.dim() > 1 else grad.reshape(1, -1),
                                            dim=-1).double().square().sum() for grad in grads]
        return torch.stack(squares).sum().sqrt().float()
    norms = torch._foreach_norm(grads, 2.0, dtype=torch.float64)
    norm = torch.linalg.vector_norm(torch.stack(norms))
    return full_tensor(norm).float()


def compiled_loss(loss_fn: Callable[..., torch.Tensor], *, backend: str) -> Callable[..., torch.Tensor]:
    """``loss_fn`` compiled, except on DTensor logits: vocabulary-sharded logits compute
    their loss through a dispatch-time context (tp's loss parallelism), which a
    compiled graph does not see (it returned the loss of the local shard)."""
    compiled = torch.compile(loss_fn, backend=backend)

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return loss_fn(logits, labels) if is_dtensor(logits) else compiled(logits, labels)

    return loss


def default_forward_backward(ctx: StepContext) -> torch.Tensor:
    logits = call_model(ctx.model_parts[0], ctx.inputs)
    loss = ctx.loss_fn(logits, ctx.labels) / ctx.grad_accumulation_steps
    del logits
    loss.backward()
    loss = loss.detach()
    return full_tensor(loss)


@contextlib.contextmanager
def train_contexts(ctx: StepContext) -> Iterator[None]:
    """The plugins' per-micro-batch contexts (context-parallel sharding, loss parallel, autocast)."""
    with contextlib.ExitStack() as stack:
        for manager in ctx.hook.plait_train_context(config=ctx.config, parallel_dims=ctx.parallel_dims, ctx=ctx):
            stack.enter_context(manager)
        yield


def forward_backward_micro_batch(ctx: StepContext) -> torch.Tensor:
    """Forward and backward of ``ctx.inputs`` inside the plugins' step contexts; the loss."""
    with train_contexts(ctx):
        loss = ctx.hook.plait_forward_backward(ctx=ctx)
        return default_forward_backward(ctx) if loss is None else loss


def evaluate_micro_batch(ctx: StepContext) -> torch.Tensor:
    """The mean loss of ``ctx.inputs`` without gradients, inside the plugins' step contexts."""
    with torch.no_grad(), train_contexts(ctx):
        loss = ctx.hook.plait_evaluate(ctx=ctx)
        if loss is None:
            loss = ctx.loss_fn(call_model(ctx.model_parts[0], ctx.inputs), ctx.labels)
            loss = full_tensor(loss)
    return loss.detach()


def run_train_step(ctx: StepContext) -> torch.Tensor:
    """One optimizer step: micro-batches with gradient accumulation, clipping, AdamW, LR;
    returns the step's loss (summed over micro-batches, each already divided by their count)."""
    hook = ctx.hook
    ctx.optimizer.zero_grad(set_to_none=True)
    total_loss = None
    for index in range(ctx.grad_accumulation_steps):
        ctx.micro_batch_index = index
        ctx.inputs, ctx.labels = next(ctx.batches)
        loss = forward_backward_micro_batch(ctx)
        total_loss = loss if total_loss is None else total_loss + loss
    ctx.results["loss"] = total_loss
    hook.plait_gradients_ready(ctx=ctx)  # may reduce gradients and the loss further (torchft)
    params = [p for part in ctx.model_parts for p in part.parameters()]
    ctx.results["grad_norm"] = clip_grad_norm_(
        params, ctx.config.training.max_norm, ctx.parallel_dims.get_optional_mesh("pp")
    )
    hook.plait_before_optimizer_step(ctx=ctx)
    ctx.optimizer.step()
    ctx.lr_scheduler.step()
    hook.plait_after_optimizer_step(ctx=ctx)
    return ctx.results["loss"]


def refuse_plain_implementations(hook_caller: Any) -> None:
    """Called by the core's own implementation of a replace-or-wrap hook, which pluggy
    reaches only when every other plain implementation returned None: those ran beside
    the core's work instead of replacing it, so name them."""
    plain = [impl.plugin_name for impl in hook_caller.get_hookimpls()
             if not (impl.wrapper or impl.hookwrapper) and impl.plugin_name != "plait.builtin"]
    if plain:
        raise PluginError(
            f"plugin(s) {', '.join(map(repr, plain))} implement {hook_caller.name} without "
            "wrapper=True and returned None, so the core's implementation would run as well: "
            "wrap it with @hookimpl(wrapper=True) (result = yield; return result), or replace "
            "it by returning a result"
        )
