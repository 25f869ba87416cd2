"""The all-to-all exchange of ``AllToAllTokenDispatcher`` as opaque operators, so that a
MoE layer under expert parallelism compiles (``torch.compile`` of whole blocks,
``fullgraph=True``) as well as it runs eagerly.

How many rows a rank receives depends on the routing of every rank: a traced graph cannot
hold that number as a constant, and the split sizes of the all-to-all are Python lists
read from tensors (``.tolist()``), which a full graph cannot trace at all. Each exchange
is therefore one custom operator: the compiler sees a call whose output has an unbacked
(data-dependent) number of rows, and the operator reads the split sizes from its count
tensors when it runs. Three operators:

``exchange_counts(sent_counts)``
    ``[ranks, local experts]`` rows this rank sends to each expert of each rank ->
    the rows it receives for each of its experts from each rank (an all-to-all of the
    counts; no gradient).
``send_rows(rows, sent_counts, received_counts)``
    ``rows`` grouped by destination rank, then expert -> the rows this rank's experts
    receive, grouped by local expert (then by source rank).
``return_rows(rows, sent_counts, received_counts)``
    the inverse: the experts' output rows back to the ranks that sent them, in the order
    they were sent.

``send_rows`` and ``return_rows`` are each other's adjoint (they only move rows), so the
backward of one is the other. ``rows``: the number of output rows when the caller knows
it (the backward knows its input's), else None (the fake tensor gets an unbacked size).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group


def _splits(counts: torch.Tensor) -> list[int]:
    """Rows per rank of a ``[ranks, local experts]`` count tensor."""
    return counts.sum(dim=1).tolist()


def _regroup(received_counts: torch.Tensor) -> torch.Tensor:
    """Indices that sort the received rows (by source rank, then local expert) by local
    expert, keeping the source order within an expert."""
    ranks, local_experts = received_counts.shape
    local_ids = torch.arange(local_experts, device=received_counts.device).repeat(ranks)
    return local_ids.repeat_interleave(received_counts.reshape(-1)).argsort(stable=True)


def _all_to_all(rows: torch.Tensor, send_splits: list[int], receive_splits: list[int], group_name: str) -> torch.Tensor:
    received = rows.new_empty(sum(receive_splits), *rows.shape[1:])
    dist.all_to_all_single(received, rows.contiguous(), receive_splits, send_splits,
                           group=_resolve_process_group(group_name))
    return received


def _fake_rows(like: torch.Tensor, rows: int | None) -> torch.Tensor:
    if rows is None:
        rows = torch.library.get_ctx().new_dynamic_size()
    return like.new_empty(rows, *like.shape[1:])


# ------------------------------------------------------------------ the counts


@torch.library.custom_op("plait_ep::exchange_counts", mutates_args=())
def exchange_counts(sent_counts: torch.Tensor, group_name: str) -> torch.Tensor:
    received_counts = torch.empty_like(sent_counts)
    dist.all_to_all_single(received_counts, sent_counts.contiguous(), group=_resolve_process_group(group_name))
    return received_counts


@exchange_counts.register_fake
def _exchange_counts_fake(sent_counts: torch.Tensor, group_name: str) -> torch.Tensor:
    return torch.empty_like(sent_counts)


# ------------------------------------------------------------------ the rows


@torch.library.custom_op("plait_ep::send_rows", mutates_args=())
def send_rows(
    rows: torch.Tensor, sent_counts: torch.Tensor, received_counts: torch.Tensor, group_name: str, out_rows: int | None
) -> torch.Tensor:
    received = _all_to_all(rows, _splits(sent_counts), _splits(received_counts), group_name)
    return received[_regroup(received_counts)]


@torch.library.custom_op("plait_ep::return_rows", mutates_args=())
def return_rows(
    rows: torch.Tensor, sent_counts: torch.Tensor, received_counts: torch.Tensor, group_name: str, out_rows: int | None
) -> torch.Tensor:
    by_source = torch.empty_like(rows).index_copy(0, _regroup(received_counts), rows)
    return _all_to_all(by_source, _splits(received_counts), _splits(sent_counts), group_name)


@send_rows.register_fake
def _send_rows_fake(rows, sent_counts, received_counts, group_name, out_rows):
    return _fake_rows(rows, out_rows)


@return_rows.register_fake
def _return_rows_fake(rows, sent_counts, received_counts, group_name, out_rows):
    return _fake_rows(rows, out_rows)


def _save_exchange(ctx, inputs, output) -> None:
    rows, sent_counts, received_counts, group_name, _ = inputs
    ctx.save_for_backward(sent_counts, received_counts)
    ctx.group_name, ctx.rows = group_name, rows.shape[0]


def _send_rows_backward(ctx, grad: torch.Tensor):
    sent_counts, received_counts = ctx.saved_tensors
    return return_rows(grad, sent_counts, received_counts, ctx.group_name, ctx.rows), None, None, None, None


def _return_rows_backward(ctx, grad: torch.Tensor):
    sent_counts, received_counts = ctx.saved_tensors
    return send_rows(grad, sent_counts, received_counts, ctx.group_name, ctx.rows), None, None, None, None


send_rows.register_autograd(_send_rows_backward, setup_context=_save_exchange)
return_rows.register_autograd(_return_rows_backward, setup_context=_save_exchange)


def allow_compiled_exchange() -> None:
    """Let Dynamo trace ``send_rows`` (an output size from the data) into a graph rather than
    break the graph before it: a compiled block holds the whole MoE layer."""
    import torch._dynamo

    torch._dynamo.config.capture_dynamic_output_shape_ops = True
