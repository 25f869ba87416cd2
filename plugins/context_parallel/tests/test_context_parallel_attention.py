"""Context-parallel attention on 2 gloo ranks against full attention in one process.

A toy chunk (a sequence buffer that scales q per position, then attention) goes through
the plugin's own ``prepare_chunk`` and per-micro-batch context, exactly as in training:
SDPA forward and backward for both rotate methods (the CPU ring-attention routes), and
flex attention forward only — torch 2.13 has no FlexAttention backward on CPU.
"""
from __future__ import annotations

import copy
import json
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from plait.cli import exit_process
from plait.model_spec import ModelSpec
from plait.nn import ScaledDotProductAttention
from plait.testing import free_port
from plait_context_parallel import cpu_ring_attention
from plait_context_parallel.attention import set_rotate_method
from plait_context_parallel.config import ROTATE_METHODS
from plait_context_parallel.load_balance import SequenceShard, head_tail_order, inverse_order
from plait_context_parallel.micro_batch import context_parallel_micro_batch, prepare_chunk

WORLD = 2
BATCH, HEADS, SEQ, HEAD_DIM = 2, 2, 32, 8
TOLERANCE = 1e-5


class FlexKernel(nn.Module):
    """Causal flex attention; ``block_mask`` covers the whole sequence."""

    def __init__(self) -> None:
        super().__init__()
        from torch.nn.attention.flex_attention import create_block_mask

        self.block_mask = create_block_mask(lambda b, h, q, kv: q >= kv, 1, 1, SEQ, SEQ, device="cpu")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention(q, k, v, block_mask=self.block_mask)


class ToyChunk(nn.Module):
    """x [batch, seq, heads * head_dim] -> attention with q scaled by a per-position buffer."""

    def __init__(self, kernel: nn.Module) -> None:
        super().__init__()
        self.kernel = kernel
        self.register_buffer("position_scale", torch.linspace(0.5, 2.0, SEQ).unsqueeze(1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq, HEADS, HEAD_DIM).transpose(1, 2)

        out = self.kernel(heads(x * self.position_scale), heads(x * 0.5), heads(x))
        return out.transpose(1, 2).reshape(batch, seq, -1)


def toy_spec(attention: str) -> ModelSpec:
    buffers = {"position_scale": 0, **({"kernel.block_mask": 2} if attention == "flex" else {})}
    return ModelSpec(
        name="toy", flavors={}, build=lambda args: None, flops_per_token=lambda args, seq: 0.0,
        block_container="kernel", cp_attention=attention, cp_attention_modules=("kernel",),
        cp_sequence_buffers=buffers,
    )  # fmt: skip


def gather_sequence(local: torch.Tensor) -> torch.Tensor:
    """All ranks' shards along dim 1, back in sequence order."""
    shards = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(shards, local.contiguous())
    order = head_tail_order(SEQ, cp_degree=dist.get_world_size())
    return torch.cat(shards, dim=1).index_select(1, inverse_order(order))


def run_toy(kernel: nn.Module, mesh, *, backward: bool) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(BATCH, SEQ, HEADS * HEAD_DIM)
    upstream = torch.randn(BATCH, SEQ, HEADS * HEAD_DIM)
    reference_chunk, cp_chunk = ToyChunk(kernel), ToyChunk(copy.deepcopy(kernel))
    reference_x = x.clone().requires_grad_(backward)
    with torch.set_grad_enabled(backward):
        reference = reference_chunk(reference_x)
        if backward:
            (reference * upstream).sum().backward()

    prepare_chunk(cp_chunk, mesh, toy_spec("flex" if isinstance(kernel, FlexKernel) else "sdpa"))
    ctx = SimpleNamespace(inputs=x, labels=None, model_parts=[cp_chunk])
    shard = SequenceShard.head_tail(SEQ, cp_degree=mesh.size(), cp_rank=mesh.get_local_rank())
    with context_parallel_micro_batch(ctx, mesh), torch.set_grad_enabled(backward):
        local_x = ctx.inputs.requires_grad_(backward)
        local_out = cp_chunk(local_x)
        if backward:
            (local_out * shard.take(upstream, dim=1)).sum().backward()
    assert ctx.inputs is x and cp_chunk.position_scale.shape[0] == SEQ  # restored after the micro-batch
    errors = {"output": (gather_sequence(local_out.detach()) - reference.detach()).abs().max().item()}
    if backward:
        errors["input_grad"] = (gather_sequence(local_x.grad) - reference_x.grad).abs().max().item()
    return errors


def rank_main(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=90)
    )
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("cp",))
        cpu_ring_attention.install()
        results = {}
        for method in ROTATE_METHODS:
            set_rotate_method(method)
            results[f"sdpa-{method}"] = run_toy(ScaledDotProductAttention(), mesh, backward=True)
        set_rotate_method("allgather")
        results["flex-forward"] = run_toy(FlexKernel(), mesh, backward=False)
        if rank == 0:
            Path(out).write_text(json.dumps(results))
        dist.barrier()  # gloo aborts a rank whose peer tears the group down while it still works
    finally:
        dist.destroy_process_group()
    exit_process(0, distributed=True)  # without the interpreter's teardown


@pytest.fixture(scope="module")
def errors(tmp_path_factory) -> dict[str, dict[str, float]]:
    out = tmp_path_factory.mktemp("cp_attention") / "errors.json"
    mp.spawn(rank_main, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return json.loads(out.read_text())


@pytest.mark.parametrize("method", ROTATE_METHODS)
def test_sdpa_ring_attention_matches_full_attention_forward_and_backward(errors, method):
    result = errors[f"sdpa-{method}"]
    assert result["output"] < TOLERANCE and result["input_grad"] < TOLERANCE, result


def test_flex_attention_forward_matches_full_attention(errors):
    assert errors["flex-forward"]["output"] < TOLERANCE, errors["flex-forward"]
