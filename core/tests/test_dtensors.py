from datetime import timedelta

import torch
import torch.distributed as dist

from plait.dtensors import full_tensor, is_dtensor, local_tensor


def test_plain_tensors_pass_through() -> None:
    plain = torch.arange(4.0)
    assert not is_dtensor(plain) and not is_dtensor(torch.nn.Parameter(plain))
    assert local_tensor(plain) is plain and full_tensor(plain) is plain


def test_a_dtensor_gives_its_shard_and_its_whole(tmp_path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1, timeout=timedelta(seconds=60)
    )
    try:
        mesh = init_device_mesh("cpu", (1,))
        whole = torch.arange(12.0).view(3, 4)
        sharded = distribute_tensor(whole, mesh, [Shard(1)])
        assert is_dtensor(sharded) and is_dtensor(distribute_tensor(whole, mesh, [Replicate()]))
        assert type(local_tensor(sharded)) is torch.Tensor and torch.equal(local_tensor(sharded), whole)
        assert type(full_tensor(sharded)) is torch.Tensor and torch.equal(full_tensor(sharded), whole)
    finally:
        dist.destroy_process_group()
