"""Bad configurations: one clear message each, before any work."""
from __future__ import annotations

import time

import pytest
import torch

from plait.cli.config_parsing import resolve_train_config
from plait.errors import ConfigError, PlaitError, PluginError
from plait.testing import free_port
from plait_torchft.runtime import check_lighthouse_reachable

BASE = ["--config", "tinylm_debug", "--plugins", "fsdp,torchft", "--torchft.lighthouse", "http://127.0.0.1:29510"]


def resolve(*options: str, tmp_path=None):
    dump = ["--job.dump_folder", str(tmp_path)] if tmp_path is not None else []
    return resolve_train_config([*BASE, *dump, *options], world_size=1)


def test_torchft_needs_fsdp():
    with pytest.raises(PluginError, match="requires plugin 'fsdp'"):
        resolve_train_config(["--config", "tinylm_debug", "--plugins", "torchft"], world_size=1)


def test_timeouts_in_the_wrong_order():
    with pytest.raises(ConfigError, match=r"--torchft.timeout_seconds \(90\) must be shorter than "
                                          r"--torchft.quorum_timeout_seconds \(30\)"):
        resolve("--torchft.timeout_seconds", "90", "--torchft.quorum_timeout_seconds", "30")
    with pytest.raises(ConfigError, match=r"quorum_timeout_seconds \(120\) must be shorter than --job.pg_timeout_seconds"):
        resolve("--job.pg_timeout_seconds", "100")


@pytest.mark.parametrize("options, message", [
    (("--torchft.replica_groups", "2", "--torchft.replica_group", "2"), "is not one of the 2 groups"),
    (("--torchft.replica_groups", "2", "--torchft.min_replicas", "3"), "min_replicas must be between 1 and"),
    (("--torchft.sync_every", "4"), "apply to --torchft.mode local_sgd or diloco"),
    (("--torchft.mode", "diloco", "--torchft.sync_every", "4", "--torchft.fragments", "3"), "must divide"),
])
def test_bad_options(options, message):
    with pytest.raises(ConfigError, match=message):
        resolve(*options)


def test_lighthouse_address_required(monkeypatch):
    monkeypatch.delenv("TORCHFT_LIGHTHOUSE", raising=False)
    with pytest.raises(ConfigError, match="needs the lighthouse's address"):
        resolve_train_config(["--config", "tinylm_debug", "--plugins", "fsdp,torchft"], world_size=1)


def test_unreachable_lighthouse_fails_within_the_connect_timeout():
    started = time.monotonic()
    with pytest.raises(PlaitError, match=r"did not answer within 2 s .*start it first"):
        check_lighthouse_reachable(f"http://127.0.0.1:{free_port()}", 2.0)
    assert time.monotonic() - started < 3


def test_each_group_gets_its_own_folder_and_data_shard(tmp_path):
    job = resolve("--torchft.replica_groups", "3", "--torchft.replica_group", "2", "--training.local_batch_size", "2",
                  "--training.global_batch_size", "12", tmp_path=tmp_path)
    assert job.config.job.dump_folder == str(tmp_path / "replica_2")
    # one checkpoint folder for the run, written by group 0 only
    assert job.config.checkpoint.folder == str(tmp_path.resolve() / "checkpoint")
    assert not job.needs.writes_checkpoints
    writer = resolve("--torchft.replica_groups", "3", "--torchft.replica_group", "0", tmp_path=tmp_path)
    assert writer.needs.writes_checkpoints and writer.config.checkpoint.folder == job.config.checkpoint.folder
    pd = job.parallel_dims
    assert (pd.dp_degree, pd.dp_rank()) == (3, 2)  # the global batch spans every group
    assert job.grad_accumulation_steps == 2  # 12 = 2 per rank x 3 groups x 2 micro-batches


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_nccl_without_cuda_is_refused():
    with pytest.raises(ConfigError, match="--torchft.backend nccl needs CUDA devices"):
        resolve("--torchft.backend", "nccl")


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="the nccl backend between replica groups needs a GPU per group: NCCL refuses two "
                           "ranks on one device, and this machine has fewer than two GPUs")
def test_two_groups_average_over_nccl(tmp_path):
    import time

    from ft_harness import start_groups, start_lighthouse, stop_all, weight_digests

    lighthouse = start_lighthouse(min_replicas=2)
    groups = []
    try:
        groups = start_groups(tmp_path / "ft", lighthouse, groups=2, ranks=1, recipe="tinylm_debug",
                              options=("--torchft.backend", "nccl"), steps=3,
                              env_for=lambda index: {"CUDA_VISIBLE_DEVICES": str(index)})  # a GPU per group
        deadline = time.monotonic() + 120
        for group in groups:
            group.wait(deadline)
    finally:
        stop_all(groups)
        lighthouse.shutdown()
    assert groups[0].result()["losses"] == groups[1].result()["losses"]
    assert weight_digests(tmp_path / "ft", 0) == weight_digests(tmp_path / "ft", 1)
