import math
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

from plait.nn.init import trunc_normal_


def _phi(x: float) -> float:
    return math.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _cdf(x: float) -> float:
    return (1 + math.erf(x / math.sqrt(2))) / 2


def _truncated_std(bound: float) -> float:
    """Standard deviation of the standard normal truncated to [-bound, bound]."""
    return math.sqrt(1 - 2 * bound * _phi(bound) / (2 * _cdf(bound) - 1))


@pytest.mark.parametrize("bound", [3.0, 2.0])
def test_draws_the_truncated_normal(bound):
    torch.manual_seed(0)
    std, mean = 0.02, 0.5
    values = trunc_normal_(torch.empty(2048, 2048, dtype=torch.float64), std=std, mean=mean, bound=bound)
    z = (values - mean) / std
    assert z.abs().max().item() <= bound  # nothing outside the bounds
    assert abs(z.mean().item()) < 3e-3
    assert z.std().item() == pytest.approx(_truncated_std(bound), abs=2e-3)  # not 1: truncated
    # The tail keeps its density up to the bound (a clamp or a too-narrow draw would not).
    tail = 2 * (_cdf(bound) - _cdf(bound - 0.5)) / (_cdf(bound) - _cdf(-bound))
    assert (z.abs() > bound - 0.5).double().mean().item() == pytest.approx(tail, rel=0.03)


def test_fills_in_place_every_layout_and_dtype():
    torch.manual_seed(1)
    weight = nn.Parameter(torch.empty(64, 32))
    assert trunc_normal_(weight, std=0.1) is weight
    assert weight.requires_grad and weight.grad_fn is None
    assert weight.abs().max().item() <= 0.3 and weight.std().item() > 0.05

    strided = torch.zeros(32, 64).t()  # not contiguous
    trunc_normal_(strided, std=1.0, bound=1.0)
    assert strided.abs().max().item() <= 1.0 and (strided != 0).all()

    scalar = torch.tensor(100.0)
    trunc_normal_(scalar, std=1.0, bound=0.5)
    assert abs(scalar.item()) <= 0.5

    half = trunc_normal_(torch.empty(4096, dtype=torch.bfloat16), std=0.02)
    assert half.float().abs().max().item() <= torch.tensor(0.06, dtype=torch.bfloat16).item()

    assert trunc_normal_(torch.empty(0, 8), std=1.0).shape == (0, 8)


def test_deterministic_under_manual_seed():
    torch.manual_seed(123)
    first = trunc_normal_(torch.empty(512, 512), std=1.0, bound=1.5)
    torch.manual_seed(123)
    second = trunc_normal_(torch.empty(512, 512), std=1.0, bound=1.5)
    assert torch.equal(first, second)


def test_meta_tensor_is_left_alone():
    rng = torch.get_rng_state()
    weight = torch.empty(1024, 1024, device="meta")
    assert trunc_normal_(weight, std=0.02) is weight
    assert weight.is_meta
    assert torch.equal(torch.get_rng_state(), rng)


def test_rejects_a_bad_std_or_bound():
    with pytest.raises(ValueError, match="std > 0"):
        trunc_normal_(torch.empty(2), std=0.0)
    with pytest.raises(ValueError, match="bound > 0"):
        trunc_normal_(torch.empty(2), std=1.0, bound=-1.0)


@pytest.mark.filterwarnings("ignore:DTensor random operators")
def test_dtensor_parameter(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1, timeout=timedelta(seconds=60)
    )
    try:
        mesh = init_device_mesh("cpu", (1,))
        weight = nn.Parameter(distribute_tensor(torch.zeros(256, 64), mesh, [Shard(0)]))
        torch.manual_seed(0)
        trunc_normal_(weight, std=0.02)
        full = weight.full_tensor()
        assert full.abs().max().item() <= 0.06 and full.std().item() > 0.015
    finally:
        dist.destroy_process_group()
