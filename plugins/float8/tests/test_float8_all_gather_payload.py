"""FSDP's all-gather of float8-converted weights carries 1 byte per element with
--float8.fsdp_float8_all_gather (float8_e4m3fn; uint8 when a group mixes it with
high-precision parameters) and 4 in float32 without, measured on FSDP's own all-gather
buffers. A fake process group of 2 ranks in this process: the sizes are real, the
gathered values are not (and are not read)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from plait_float8.config import Float8Config, torchao_config


@pytest.fixture
def fake_two_ranks():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    assert not dist.is_initialized()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        yield
    finally:
        dist.destroy_process_group()


def gathered_payload(all_gather: bool) -> list[tuple[str, int]]:
    """(dtype, bytes per rank) of each all-gather FSDP runs for a forward of two converted linears."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group
    from torchao.float8 import convert_to_float8_training

    gathered = []
    original = _fsdp_param_group.foreach_all_gather

    def recording(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        result = original(*args, **kwargs)
        out = result.all_gather_output
        gathered.append((str(out.dtype).removeprefix("torch."), out.numel() * out.element_size() // 2))
        return result

    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False))
    section = Float8Config(emulate=True, auto_filter=False, fsdp_float8_all_gather=all_gather)
    convert_to_float8_training(model, config=torchao_config(section))
    fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
    _fsdp_param_group.foreach_all_gather = recording
    try:
        model(torch.randn(4, 64))
    finally:
        _fsdp_param_group.foreach_all_gather = original
    return gathered


def test_all_gather_payload(fake_two_ranks):
    elements_per_rank = 2 * 64 * 64 // 2
    assert gathered_payload(all_gather=True) == [("float8_e4m3fn", elements_per_rank * 1)]
    assert gathered_payload(all_gather=False) == [("float32", elements_per_rank * 4)]
