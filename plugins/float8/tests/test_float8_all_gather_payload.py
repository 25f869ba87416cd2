"""FSDP's all-gather of float8-converted weights carries 1 byte per element with
--float8.fsdp_float8_all_gather (float8_e4m3fn; uint8 when a group mixes it with
high-precision parameters) and 4 in float32 without, measured on FSDP's own all-gather
buffers; tensor parallelism with the float8 styles gathers activations and gradients at
1 byte per element. A fake process group of 2 ranks in this process: the sizes are real,
the gathered values are not (and are not read)."""
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


def test_tp_activation_payload_matches_the_plan_count(fake_two_ranks):
    """Tensor parallelism with the float8 styles on a column- then row-parallel pair whose
    parent gathers the sequence-sharded input: the forward gathers that input once in
    e4m3 and the backward the row-parallel output's gradient in e5m2, 1 byte per element
    each (recorded where the float8 data enters the collective); ``plait plan``'s count of
    the same step adds the two 4-byte scales."""
    pytest.importorskip("plait_tp")
    from torch.distributed.device_mesh import init_device_mesh
    from torchao.float8 import convert_to_float8_training, float8_ops

    from plait.plan import AllGatherBytes
    from plait_float8.tensor_parallel import gather_float8_as_bytes, mark_float8_styles
    from plait_tp.plan import StyleOptions, apply_plan

    model = nn.Sequential(nn.Sequential(nn.Linear(64, 128, bias=False), nn.Linear(128, 64, bias=False)))
    convert_to_float8_training(model, config=torchao_config(Float8Config(emulate=True, auto_filter=False)))
    styles = {"0": "prepare_input", "0.0": "colwise", "0.1": "rowwise"}
    assert mark_float8_styles(model, styles) == ["0", "0.0", "0.1"]
    apply_plan(model, init_device_mesh("cpu", (2,)), styles, StyleOptions())
    gather_float8_as_bytes()
    op = torch.ops._c10d_functional.all_gather_into_tensor.default
    installed, gathered = float8_ops.FLOAT8_OPS_TABLE[op], []

    def recording(aten_op, args, kwargs=None):  # noqa: ANN001, ANN202
        data = args[0]._data
        gathered.append((str(data.dtype).removeprefix("torch."), 2 * data.numel() * data.element_size()))
        return installed(aten_op, args, kwargs)

    float8_ops.FLOAT8_OPS_TABLE[op] = recording
    try:
        with AllGatherBytes() as counted:
            local = torch.randn(2, 8, 64)  # this rank's half of 16 positions
            out = model(local)
            out.backward(torch.ones_like(out))
    finally:
        float8_ops.FLOAT8_OPS_TABLE[op] = installed
    tokens = 2 * 16
    assert gathered == [("float8_e4m3fn", tokens * 64), ("float8_e5m2", tokens * 64)]
    assert counted.bytes == sum(size for _, size in gathered) + 2 * 4
