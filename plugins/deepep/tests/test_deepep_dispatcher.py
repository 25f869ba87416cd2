"""The DeepEP dispatcher's contract: 2 ranks, each holding half the experts of an MoE
layer, dispatch through DeepEP's API and must compute what one process with all the
experts computes: outputs, gradients of the tokens, of the router and of the experts (each
rank's experts see both ranks' tokens).

On CPU the buffer is a gloo stand-in for ``deep_ep.Buffer`` (``gloo_deep_ep``); with two
GPUs and DeepEP installed, the same test runs on the real buffer over NCCL, in bf16."""
from __future__ import annotations

import importlib.util
import json
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from plait.cli import exit_process
from plait.nn.moe import MoE, MoEArgs
from plait.testing import free_port

WORLD = 2
TOKENS, DIM = 24, 16
TOLERANCE = {"gloo": 1e-5, "nccl": 3e-2}  # the real buffer moves bf16 tokens
HAS_DEEP_EP = importlib.util.find_spec("deep_ep") is not None
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


def moe_layer(shared_experts: int) -> MoE:
    torch.manual_seed(0)
    args = MoEArgs(num_experts=4, top_k=2, hidden_dim=8, num_shared_experts=shared_experts,
                   score_func="sigmoid", normalize_weights=True, route_scale=2.5)  # fmt: skip
    layer = MoE(dim=DIM, args=args)
    layer.init_weights(std=0.2, out_std=0.2)
    return layer


def inputs(rank: int) -> torch.Tensor:
    return torch.randn(1, TOKENS, DIM, generator=torch.Generator().manual_seed(100 + rank), requires_grad=True)


def loss_of(out: torch.Tensor) -> torch.Tensor:
    return (out * torch.linspace(-1, 1, DIM)).sum()


def local_experts(rank: int) -> slice:
    return slice(2 * rank, 2 * rank + 2)


def _rank(rank: int, port: int, folder: str, shared_experts: int, overlap: bool, backend: str) -> None:
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        from plait_deepep.dispatcher import DeepEPTokenDispatcher

        buffers = []

        def make_buffer(hidden_bytes: int):
            if backend == "nccl":
                from plait_deepep.buffer import deep_ep_buffer

                buffers.append(deep_ep_buffer(dist.group.WORLD, hidden_bytes=hidden_bytes, num_sms=24))
            else:
                import gloo_deep_ep

                buffers.append(gloo_deep_ep.GlooDeepEPBuffer(dist.group.WORLD))
            return buffers[-1]

        layer = moe_layer(shared_experts).to(device)
        layer.dispatcher = DeepEPTokenDispatcher(make_buffer, ranks=WORLD, overlap_shared_experts=overlap,
                                                 wire_dtype=torch.bfloat16 if backend == "nccl" else None)
        for weight in layer.experts.parameters():  # this rank's half, as expert parallelism shards it
            weight.data = weight.data[local_experts(rank)].clone()
        x = inputs(rank).detach().to(device).requires_grad_()
        out = layer(x)
        loss_of(out.cpu()).backward()
        result = {
            "out": out.tolist(),
            "x": x.grad.tolist(),
            "router": layer.router.gate.weight.grad.tolist(),
            "experts": {name: w.grad.tolist() for name, w in layer.experts.named_parameters()},
            # counted by the stand-in only
            "combines": getattr(buffers[0], "combines", None),
            "async_combines": getattr(buffers[0], "async_combines", None),
        }
        Path(folder, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()  # gloo aborts a rank whose peer tears the group down while it still works
    finally:
        dist.destroy_process_group()
    exit_process(0, distributed=True)  # without the interpreter's teardown


BACKENDS = [
    pytest.param("gloo", id="cpu-gloo-stand-in"),
    pytest.param("nccl", id="cuda-deep_ep", marks=pytest.mark.skipif(
        not HAS_DEEP_EP or GPUS < WORLD,
        reason=f"needs the deep_ep library and {WORLD} GPUs (deep_ep installed: {HAS_DEEP_EP}, GPUs: {GPUS}); "
        "the gloo stand-in covers the dispatcher on CPU")),
]  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("shared_experts", "overlap"), [(0, False), (1, True), (1, False)])
def test_two_ranks_through_deepep_api_match_one_process(tmp_path, monkeypatch, shared_experts, overlap, backend):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the spawned ranks import gloo_deep_ep
    mp.spawn(_rank, args=(free_port(), str(tmp_path), shared_experts, overlap, backend), nprocs=WORLD, join=True)
    tolerance = TOLERANCE[backend]

    both = moe_layer(shared_experts)  # all experts, both ranks' tokens: the experts' gradients
    sum(loss_of(both(inputs(rank))) for rank in range(WORLD)).backward()
    for rank in range(WORLD):
        got = json.loads(Path(tmp_path, f"rank{rank}.json").read_text())
        alone = moe_layer(shared_experts)  # all experts, this rank's tokens: the rest
        x = inputs(rank)
        out = alone(x)
        loss_of(out).backward()
        assert torch.allclose(torch.tensor(got["out"]), out, atol=tolerance)
        assert torch.allclose(torch.tensor(got["x"]), x.grad, atol=tolerance)
        assert torch.allclose(torch.tensor(got["router"]), alone.router.gate.weight.grad, atol=tolerance)
        for name, weight in both.experts.named_parameters():
            assert torch.allclose(torch.tensor(got["experts"][name]), weight.grad[local_experts(rank)],
                                  atol=tolerance), name
        if backend == "gloo":  # one combine in forward, one in the dispatch's backward; async only to overlap
            assert got["combines"] == 2
            assert got["async_combines"] == int(overlap and shared_experts > 0)
