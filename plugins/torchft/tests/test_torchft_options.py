"""Bad configurations: one clear message each, before any work."""
from __future__ import annotations

import time

import pytest

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
    pd = job.parallel_dims
    assert (pd.dp_degree, pd.dp_rank()) == (3, 2)  # the global batch spans every group
    assert job.grad_accumulation_steps == 2  # 12 = 2 per rank x 3 groups x 2 micro-batches
