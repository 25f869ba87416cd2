"""The float8 plugin's decisions before any work: config errors, capability gating on
simulated devices, and the table of converted and skipped linears."""
from __future__ import annotations

import pytest
import torch

from plait.capabilities import simulated_device
from plait.errors import ConfigError
from plait_float8.config import Float8Config, shape_rule, torchao_config
from plait.low_precision import decide_modules, format_table

TINY = ["--config", "llama3_debugmodel", "--model.flavor", "debugmodel_tiny", "--training.seq_len", "64"]


def resolved(*argv: str, device=None, world_size: int = 1):  # noqa: ANN001, ANN201
    from plait.cli.config_parsing import parse_config, parse_selection, select_plugins
    from plait.job import resolve_job

    selection, rest = parse_selection([*TINY, *argv])
    manager, base = select_plugins(selection)
    config = parse_config(manager, base, rest, selection=selection)
    return resolve_job(config, manager, manager.model_spec(config.model.name), world_size, device=device)


def test_unknown_recipe_lists_the_recipes():
    with pytest.raises(ConfigError, match="choose one of: tensorwise, rowwise, rowwise_with_gw_hp"):
        Float8Config(recipe="blockwise").validate()


def test_float8_all_gather_needs_tensorwise():
    with pytest.raises(ConfigError, match="needs --float8.recipe tensorwise"):
        Float8Config(recipe="rowwise", fsdp_float8_all_gather=True).validate()


def test_float8_all_gather_needs_sharded_parameters():
    with pytest.raises(ConfigError, match="does not shard parameters"):
        resolved("--plugins", "float8", "--float8.emulate", "True", "--float8.auto_filter", "False",
                 "--float8.fsdp_float8_all_gather", "True")


def test_cpu_without_emulate_is_refused_naming_the_capability():
    with pytest.raises(ConfigError, match=r"plugin 'float8' needs float8_matmul .*--float8.emulate True"):
        resolved("--plugins", "float8", "--float8.auto_filter", "False", device=simulated_device("cpu"))


@pytest.mark.parametrize(("device", "accepted"), [("H100", True), ("L4", True), ("A100", False)])
def test_float8_matmul_capability_decides(device, accepted):
    argv = ("--plugins", "float8", "--float8.auto_filter", "False")
    if accepted:
        job = resolved(*argv, device=simulated_device(device))
        assert job.device.capabilities.float8_dtypes == ("float8_e4m3fn", "float8_e5m2")
    else:
        with pytest.raises(ConfigError, match="needs float8_matmul"):
            resolved(*argv, device=simulated_device(device))


def test_nothing_to_convert_is_refused_with_the_table():
    with pytest.raises(ConfigError, match=r"(?s)0 of 15 modules converted.*auto_filter: K <= 4096.*"
                                          r"--float8.auto_filter False"):
        resolved("--plugins", "float8", "--float8.emulate", "True")


def test_device_float8_pair_reaches_every_cast():
    """AMD gfx942 takes the fnuz pair: forward e4m3fnuz, gradients e5m2fnuz (tensorwise)."""
    config = torchao_config(Float8Config(), ("float8_e4m3fnuz", "float8_e5m2fnuz"))
    assert config.cast_config_input.target_dtype == torch.float8_e4m3fnuz
    assert config.cast_config_weight.target_dtype == torch.float8_e4m3fnuz
    assert config.cast_config_grad_output.target_dtype == torch.float8_e5m2fnuz
    rowwise = torchao_config(Float8Config(recipe="rowwise"), ("float8_e4m3fnuz", "float8_e5m2fnuz"))
    assert rowwise.cast_config_grad_output.target_dtype == torch.float8_e4m3fnuz  # rowwise: e4m3 everywhere


def test_decisions_name_each_skip():
    from plait_qwen3.spec import qwen3_spec

    spec = qwen3_spec()
    model = spec.build_meta(spec.args_for("debugmodel_moe"))
    section = Float8Config(filter_fqns=["output", "layers.0"], auto_filter=True)
    decisions = {d.path: d for d in decide_modules(model, filter_fqns=section.filter_fqns,
                                                   shape_rule=shape_rule(section))}
    assert decisions["output"].reason == "filter_fqns pattern 'output'"
    assert decisions["layers.0.attention.wq"].reason == "filter_fqns pattern 'layers.0'"
    assert decisions["layers.1.moe.router.gate"].reason.startswith("MoE router")
    assert decisions["layers.1.attention.wq"].reason.startswith("auto_filter")
    table = format_table("float8", list(decisions.values()))
    assert "layers.1.moe.router.gate" in table and "skipped" in table


def test_shape_rule():
    rule = shape_rule(Float8Config(auto_filter=False))
    assert rule(64, 48) is None
    assert "not multiples of 16" in rule(64, 40)
    tensorwise, rowwise = shape_rule(Float8Config()), shape_rule(Float8Config(recipe="rowwise"))
    assert tensorwise(4096, 4096) is None and tensorwise(1024, 4096) is not None
    assert rowwise(8192, 4096) is None and rowwise(4096, 2048) is not None


def test_plan_counts_float8_all_gather_at_one_byte_per_element():
    """`plait plan` counts what FSDP all-gathers: with float8 all-gather the converted
    linears' weights travel at 1 byte per element instead of 4, in the forward and again
    in the backward (the blocks reshard after forward)."""
    from plait.plan import plan

    fsdp2 = ("--plugins", "float8,fsdp", "--parallelism.dp_shard", "2", "--float8.emulate", "True",
             "--float8.auto_filter", "False")
    plain = plan(resolved(*fsdp2, world_size=2))
    job = resolved(*fsdp2, "--float8.fsdp_float8_all_gather", "True", world_size=2)
    float8 = plan(job)
    converted = sum(module.weight.numel() for path, module in job.meta_model.named_modules()
                    if path.startswith("layers.") and type(module) is torch.nn.Linear)
    saved = plain.ranks[0].all_gather_bytes - float8.ranks[0].all_gather_bytes
    assert saved == 2 * converted * (4 - 1)
