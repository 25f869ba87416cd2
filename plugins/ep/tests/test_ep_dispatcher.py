"""All-to-all dispatch and combine on 2 gloo ranks give what one process computes with
every expert local: the same outputs and the same token gradients, for uneven counts
(one expert gets no row at all)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from plait.cli import exit_process
from plait.nn.moe import LocalTokenDispatcher, Routing, count_tokens_per_expert

from plait_ep.dispatcher import AllToAllTokenDispatcher

RANKS = 2
NUM_EXPERTS = 4  # 2 per rank
DIM = 3
TOP_K = 2


def routing_of(rank: int) -> Routing:
    """Rank 0 sends 7 rows to rank 0 (experts 0, 1) and 1 to rank 1 (expert 3); rank 1
    sends 3 and 3. Expert 2 gets nothing."""
    experts = torch.tensor([[0, 3], [0, 1], [1, 0], [0, 1]] if rank == 0 else [[3, 1], [0, 3], [1, 3]])
    weights = torch.rand(experts.shape, generator=torch.Generator().manual_seed(10 + rank))
    return Routing(
        experts=experts,
        weights=weights,
        scores=torch.zeros(experts.shape[0], NUM_EXPERTS),
        tokens_per_expert=count_tokens_per_expert(experts, NUM_EXPERTS),
    )


def tokens_of(rank: int) -> torch.Tensor:
    rows = routing_of(rank).experts.shape[0]
    return torch.randn(rows, DIM, generator=torch.Generator().manual_seed(rank)).requires_grad_()


def run_experts(rows: torch.Tensor, tokens_per_expert: torch.Tensor, first_expert: int) -> torch.Tensor:
    """Expert e multiplies its rows by (e + 1) and adds e: each expert is recognizable."""
    expert_ids = torch.arange(first_expert, first_expert + len(tokens_per_expert)).repeat_interleave(tokens_per_expert)
    return rows * (expert_ids + 1).unsqueeze(1) + expert_ids.unsqueeze(1)


def local_reference(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, routing = tokens_of(rank), routing_of(rank)
    dispatcher = LocalTokenDispatcher()
    dispatched = dispatcher.dispatch(tokens, routing)
    out = dispatcher.combine(run_experts(dispatched.tokens, dispatched.tokens_per_expert, 0), dispatched, routing)
    (out * torch.arange(1.0, DIM + 1)).sum().backward()
    return out.detach(), tokens.grad


def _rank(rank: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=RANKS)
    try:
        tokens, routing = tokens_of(rank), routing_of(rank)
        dispatcher = AllToAllTokenDispatcher(dist.group.WORLD)
        dispatched = dispatcher.dispatch(tokens, routing)
        local_experts = NUM_EXPERTS // RANKS
        expert_outputs = run_experts(dispatched.tokens, dispatched.tokens_per_expert, rank * local_experts)
        out = dispatcher.combine(expert_outputs, dispatched, routing)
        (out * torch.arange(1.0, DIM + 1)).sum().backward()
        torch.save(
            {"out": out.detach(), "grad": tokens.grad, "tokens_per_expert": dispatched.tokens_per_expert,
             "rows": dispatched.tokens.detach()},
            os.path.join(results, f"rank{rank}.pt"),
        )
        dist.barrier()  # gloo aborts a rank whose peer tears the group down while it still works
    finally:
        dist.destroy_process_group()
    exit_process(0, distributed=True)  # without the interpreter's teardown


def test_dispatch_and_combine_match_local_experts(tmp_path: Path) -> None:
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=RANKS, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(RANKS)]

    # Rows per expert (from rank 0 + from rank 1): expert 0 4 + 1, expert 1 3 + 2, expert 2 none, expert 3 1 + 3.
    assert results[0]["tokens_per_expert"].tolist() == [5, 5]
    assert results[1]["tokens_per_expert"].tolist() == [0, 4]
    # Each local expert's rows are contiguous: expert 0 sees rank 0's tokens 0-3, then rank 1's token 1.
    expected_rows = torch.cat([tokens_of(0)[:4], tokens_of(1)[[1]]])
    torch.testing.assert_close(results[0]["rows"][:5], expected_rows.detach())

    for rank in range(RANKS):
        out, grad = local_reference(rank)
        torch.testing.assert_close(results[rank]["out"], out, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(results[rank]["grad"], grad, rtol=1e-6, atol=1e-6)
