"""The mxfp8 plugin's decisions before any work: config errors, capability and kernel
gating on simulated devices, shape and token-count validation naming what to change,
and the table of converted and skipped modules."""
from __future__ import annotations

import pytest

from plait.capabilities import simulated_device
from plait.errors import ConfigError
from plait.low_precision import GROUPED_EXPERTS, decide_modules, format_table
from plait_mxfp8.config import Mxfp8Config, shape_rule

TINY = ["--config", "llama3_debugmodel", "--model.flavor", "debugmodel_tiny", "--training.seq_len", "64",
        "--training.local_batch_size", "2"]
EMULATED = ("--plugins", "mxfp8", "--mxfp8.emulate", "True")


def resolved(*argv: str, base: list[str] = TINY, device=None, world_size: int = 1):  # noqa: ANN001, ANN201
    from plait.cli import resolve_train_config

    return resolve_train_config([*base, *argv], world_size=world_size, device=device)


def test_unknown_recipe_lists_the_recipes():
    with pytest.raises(ConfigError, match="choose one of: rceil, rceil_wgrad_with_hp"):
        Mxfp8Config(recipe="floor").validate()


@pytest.mark.parametrize("device", ["cpu", "H100"])
def test_device_without_mx_kernels_is_refused_naming_the_capability(device):
    with pytest.raises(ConfigError, match=r"plugin 'mxfp8' needs mxfp8 .*--mxfp8.emulate True"):
        resolved("--plugins", "mxfp8", device=simulated_device(device))


def test_mx_device_without_torchao_kernels_is_refused():
    """A B200 has the capability, but this torchao installation (CPU, no triton) has no MXFP8 kernels."""
    with pytest.raises(ConfigError, match=r"needs torchao's MXFP8 kernels .*--mxfp8.emulate True"):
        resolved("--plugins", "mxfp8", device=simulated_device("B200"))


def test_emulated_run_is_accepted_with_group_alignment():
    job = resolved(*EMULATED)
    assert job.needs.moe_group_alignment == 32


def test_token_count_not_a_multiple_of_32_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"as 40 tokens per rank .*local_batch_size × --training.seq_len a "
                                          r"multiple of 32"):
        resolved(*EMULATED, "--training.local_batch_size", "1", "--training.seq_len", "40")


def test_unaligned_features_are_refused_naming_each_module():
    """The plugin's validation on a model whose second linear has 48 output features."""
    from types import SimpleNamespace

    from torch import nn

    from plait_mxfp8.plugin import plait_validate

    job = resolved(*EMULATED)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 48), nn.Linear(48, 64))
    with pytest.raises(ConfigError, match=r"(?s)not multiples of 32 .*\n  1 \(linear 64->48\)\n  2 \(linear 48->64\)"
                                          r"\nkeep them in high precision with --mxfp8.filter_fqns output,1,2"):
        plait_validate(config=job.config, parallel_dims=job.parallel_dims, model_spec=job.spec,
                       job=SimpleNamespace(meta_model=model, tokens_per_sample=64))


def test_nothing_to_convert_is_refused_with_the_table():
    with pytest.raises(ConfigError, match=r"(?s)would convert no module.*0 of 15 modules converted"):
        resolved(*EMULATED, "--mxfp8.filter_fqns", "layers", "output")


def test_decisions_cover_grouped_experts_and_skip_the_router():
    from plait_qwen3.spec import qwen3_spec

    spec = qwen3_spec()
    model = spec.build_meta(spec.args_for("debugmodel_moe"))
    section = Mxfp8Config(filter_fqns=["output", "layers.0"])
    decisions = {d.path: d for d in decide_modules(model, filter_fqns=section.filter_fqns, shape_rule=shape_rule,
                                                   grouped_experts=True)}
    assert decisions["layers.1.moe.router.gate"].reason.startswith("MoE router")
    assert decisions["layers.0.moe.experts"].reason == "filter_fqns pattern 'layers.0'"
    experts = decisions["layers.1.moe.experts"]
    assert experts.kind == GROUPED_EXPERTS and experts.converted
    assert "layers.1.moe.experts" in format_table("mxfp8", list(decisions.values()))
    assert shape_rule(64, 48) == "in/out features 48/64 not multiples of 32 (MXFP8 block size)"
