"""Expert parallelism under ``torch.compile``.

- A MoE layer whose experts are sharded over 2 gloo ranks compiles as one graph
  (``fullgraph=True``) with the all-to-all dispatcher, and computes what it computes
  eagerly: the same outputs, token gradients and expert gradients, over several calls with
  different routings (so different, data-dependent exchange sizes) and a shared expert.
  The exchange operators give the rows a rank receives an unbacked size; Dynamo traces
  them with ``capture_dynamic_output_shape_ops`` (``plait_ep.exchange.allow_compiled_exchange``).
- ep 2 with ``--compile.enable`` trains like ep 2 eagerly (losses and gradient norms within
  1e-5; ``aot_eager``: Dynamo and AOTAutograd trace what inductor would compile, without
  its C++ build).

Under ep the plugin declares ``RunNeeds(compile_fullgraph=False)``, so the core compiles
blocks with graph breaks allowed: the expert slices are FSDP units of their own, and
FSDP2 runs their hooks under ``torch._dynamo.disable`` (two graph breaks per MoE block,
the only ones: the exchange, routing and experts trace).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

from plait.cli import exit_process
from plait.nn.moe import MoE, MoEArgs
from plait.testing import run_ranks

from plait_ep.dispatcher import AllToAllTokenDispatcher
from plait_ep.exchange import allow_compiled_exchange
from plait_ep.sharding import shard_experts

RANKS = 2
DIM = 16
CALLS = 3


def make_layer(shared_experts: int) -> MoE:
    torch.manual_seed(0)
    args = MoEArgs(num_experts=4, top_k=2, hidden_dim=32, num_shared_experts=shared_experts, normalize_weights=True)
    layer = MoE(dim=DIM, args=args)
    layer.init_weights(std=0.2, out_std=0.2)
    layer.aux_loss_weight = 1e-2
    return layer


def run(layer: MoE, rank: int) -> list[dict[str, torch.Tensor]]:
    results = []
    for call in range(CALLS):
        x = torch.randn(2, 5 + call, DIM, generator=torch.Generator().manual_seed(100 * call + rank))
        x.requires_grad_()
        out = layer(x)
        (out * torch.arange(1.0, DIM + 1)).sum().backward()
        grads = {name: param.grad.to_local() if hasattr(param.grad, "to_local") else param.grad
                 for name, param in layer.named_parameters()}
        results.append({"out": out.detach(), "x_grad": x.grad, **grads})
        layer.zero_grad()
    return results


def _rank(rank: int, init_file: str, folder: str, backend: str, shared_experts: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=RANKS)
    try:
        mesh = init_device_mesh("cpu", (RANKS,), mesh_dim_names=("ep",))
        results = {}
        for mode in ("eager", "compiled"):
            layer = make_layer(shared_experts)
            shard_experts(layer.experts, mesh)
            layer.dispatcher = AllToAllTokenDispatcher(mesh.get_group())
            if mode == "compiled":
                allow_compiled_exchange()
                torch._dynamo.reset()
                layer.compile(backend=backend, fullgraph=True)
            results[mode] = run(layer, rank)
        torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
        dist.barrier()  # gloo aborts a rank whose peer tears the group down while it still works
    finally:
        dist.destroy_process_group()
    exit_process(0, distributed=True)  # without the interpreter's teardown


def test_compiled_moe_layer_matches_eager(tmp_path: Path) -> None:
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path), "aot_eager", 1),
             nprocs=RANKS, join=True)
    for rank in range(RANKS):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for call, (eager, compiled) in enumerate(zip(results["eager"], results["compiled"])):
            assert sorted(eager) == sorted(compiled)
            for name in eager:
                torch.testing.assert_close(compiled[name], eager[name], rtol=1e-5, atol=1e-5,
                                           msg=f"rank {rank} call {call} {name}")


# ------------------------------------------------------------------ a training run


def job(dump: Path, *extra: str) -> list[str]:
    return [
        "--config", "qwen3_moe_debugmodel",
        "--moe.aux_loss_type", "sequence",
        "--plugins", "ep,fsdp", "--parallelism.dp_shard", "2", "--parallelism.ep", "2",
        "--training.steps", "4",
        "--training.seq_len", "64",
        "--training.local_batch_size", "2",
        "--training.deterministic", "True",
        "--lr_scheduler.warmup_steps", "2",
        "--checkpoint.enable", "False",
        "--metrics.progress", "off",
        "--job.pg_timeout_seconds", "90",
        "--job.dump_folder", str(dump),
        *extra,
    ]  # fmt: skip


def test_ep2_compiled_trains_like_eager(tmp_path: Path) -> None:
    compiled = run_ranks(RANKS, job(tmp_path / "compiled", "--compile.enable", "True", "--compile.backend",
                                    "aot_eager"), tmp_path / "compiled.json")
    eager = run_ranks(RANKS, job(tmp_path / "eager"), tmp_path / "eager.json")
    assert sorted(compiled["losses"]) == sorted(eager["losses"]) == [1, 2, 3, 4]
    for key in ("losses", "grad_norms"):
        difference = max(abs(compiled[key][step] - eager[key][step]) for step in eager[key])
        assert difference < 1e-5, (key, compiled, eager)
