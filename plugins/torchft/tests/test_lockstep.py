"""Two replica groups of two FSDP ranks each train in lockstep (synchronous mode): every
step's loss equals, within 1e-5, one process training on the union of the groups'
batches, and the groups end with bit-identical weights. About 60 s on a loaded 2-core
machine (four ranks and a reference process start up)."""
from __future__ import annotations

import time

import torch

from ft_harness import FT_TIMEOUTS, Group, final_weights, start_lighthouse, stop_all
from plait.testing import assert_losses_match, short_job, train_in_this_process

STEPS = 4


def test_two_fsdp_groups_match_one_process(tmp_path):
    lighthouse = start_lighthouse(min_replicas=2)
    groups = []
    try:
        for index in range(2):
            argv = short_job("llama3_debugmodel", tmp_path / "ft", "--model.flavor", "debugmodel_tiny",
                             "--plugins", "fsdp,torchft", "--parallelism.dp_shard", "2",
                             "--torchft.lighthouse", lighthouse.address(), "--torchft.replica_groups", "2",
                             "--torchft.replica_group", str(index), "--torchft.min_replicas", "2", *FT_TIMEOUTS,
                             steps=STEPS, lr=1e-2, local_batch_size=1, checkpoint_interval=STEPS)
            groups.append(Group(index, 2, argv, tmp_path / f"out{index}.json").start())
        # the same global batch (2 groups x 2 ranks x 1 row) in one process
        reference = train_in_this_process(short_job("llama3_debugmodel", tmp_path / "single", "--model.flavor",
                                                    "debugmodel_tiny", steps=STEPS, lr=1e-2,
                                                    local_batch_size=4, checkpoint_interval=STEPS))
        deadline = time.monotonic() + 180
        for group in groups:
            group.wait(deadline)
    finally:
        stop_all(groups)
        lighthouse.shutdown()
    results = [group.result() for group in groups]
    assert results[0]["losses"] == results[1]["losses"]
    assert_losses_match(reference["losses"], results[0]["losses"], first_step=1, steps=STEPS)
    weights = [final_weights(tmp_path / "ft", g, "llama3", "debugmodel_tiny", step=STEPS) for g in (0, 1)]
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name
