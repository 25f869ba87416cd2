"""Configurations expert parallelism cannot run are refused before any work starts, with
a message that says what to change."""
from __future__ import annotations

import pytest

from plait.cli import resolve_train_config
from plait.errors import ConfigError


def validate(world_size: int, *argv: str) -> None:
    """The checks ``plait train`` runs (on ``world_size`` ranks) before it starts any work."""
    resolve_train_config(["--config", "qwen3_moe_debugmodel", "--plugins", "ep,fsdp", *argv], world_size=world_size)


@pytest.mark.parametrize(
    ("world_size", "argv", "message"),
    [
        pytest.param(
            3, ["--parallelism.ep", "3", "--parallelism.dp_shard", "3"],
            r"--parallelism.ep 3 must divide the 8 experts of each MoE layer of qwen3/debugmodel_moe: "
            r"valid ep degrees are 1, 2, 4, 8",
            id="ep-does-not-divide-experts",
        ),
        pytest.param(
            4, ["--parallelism.ep", "4", "--parallelism.dp_shard", "2", "--parallelism.dp_replicate", "2"],
            r"--parallelism.ep 4 must divide dp_shard 2 × cp 1 × tp 1 = 2",
            id="ep-does-not-divide-dp-shard",
        ),
        pytest.param(
            2, ["--parallelism.ep", "2", "--parallelism.dp_shard", "2", "--model.flavor", "debugmodel"],
            r"qwen3/debugmodel has no expert modules \(a dense flavor.*--model.flavor",
            id="dense-flavor",
        ),
    ],
)
def test_unsupported_configurations_are_refused(world_size, argv, message):
    with pytest.raises(ConfigError, match=message):
        validate(world_size, *argv)


def test_a_model_without_expert_modules_is_refused_by_name(monkeypatch):
    from plait_qwen3 import spec as qwen3_spec

    original = qwen3_spec.qwen3_spec

    def without_experts():
        spec = original()
        spec.expert_modules = ()
        return spec

    monkeypatch.setattr(qwen3_spec, "qwen3_spec", without_experts)
    with pytest.raises(ConfigError, match=r"model 'qwen3' declares no expert modules \(it is a dense model\)"):
        validate(2, "--parallelism.ep", "2", "--parallelism.dp_shard", "2")


def test_the_ep_plugin_needs_fsdp():
    with pytest.raises(ConfigError, match=r"plugin 'ep' requires plugin 'fsdp'"):
        resolve_train_config(["--config", "qwen3_moe_debugmodel", "--plugins", "ep"])


@pytest.mark.parametrize(
    ("world_size", "argv"),
    [
        (2, ["--parallelism.ep", "2", "--parallelism.dp_shard", "2"]),
        (8, ["--parallelism.ep", "8", "--parallelism.dp_shard", "8"]),
        (4, ["--parallelism.ep", "2", "--parallelism.dp_shard", "2", "--parallelism.dp_replicate", "2"]),
        (1, ["--model.flavor", "debugmodel"]),  # ep 1: the plugin leaves dense models alone
    ],
)
def test_supported_configurations_pass(world_size, argv):
    validate(world_size, *argv)
