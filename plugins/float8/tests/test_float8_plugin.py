"""The float8 plugin's decisions before any work: config errors, capability gating on
simulated devices, and the table of converted and skipped linears."""
from __future__ import annotations

import copy

import pytest
import torch

from plait.capabilities import simulated_device
from plait.errors import ConfigError
from plait.nn.moe import MoE, MoEArgs
from plait_float8.config import Float8Config, grouped_op_config, shape_rule, torchao_config
from plait.low_precision import decide_modules, format_table

TINY = ["--config", "llama3_debugmodel", "--model.flavor", "debugmodel_tiny", "--training.seq_len", "64"]


def resolved(*argv: str, base: list[str] = TINY, device=None, world_size: int = 1):  # noqa: ANN001, ANN201
    from plait.cli import resolve_train_config

    return resolve_train_config([*base, *argv], world_size=world_size, device=device)


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


def test_plan_counts_float8_tp_activations_at_one_byte_per_element():
    """Under TP 2 with tensorwise float8, each block all-gathers its attention and
    feed-forward inputs (forward) and the gradients of its two row-parallel outputs
    (backward) in float8: 1 byte per element plus a 4-byte scale. The LM head's input and
    the embedding's output gradient stay float32. rowwise keeps torch's plain styles.
    Parameters, gradients and optimizer state stay float32 either way."""
    from plait.plan import plan

    tp2 = ("--plugins", "float8,tp", "--parallelism.tp", "2", "--float8.emulate", "True",
           "--float8.auto_filter", "False")
    job = resolved(*tp2, world_size=2)
    tensorwise = plan(job).ranks[0]
    rowwise = plan(resolved(*tp2, "--float8.recipe", "rowwise", world_size=2)).ranks[0]
    activation = job.config.training.local_batch_size * job.config.training.seq_len * job.model_args.dim
    layers = job.model_args.n_layers
    assert tensorwise.all_gather_bytes == 4 * layers * (activation * 1 + 4) + 2 * activation * 4
    assert rowwise.all_gather_bytes == (4 * layers + 2) * activation * 4
    for field in ("parameter_bytes", "gradient_bytes", "optimizer_bytes"):
        assert getattr(tensorwise, field) == getattr(rowwise, field), field
    assert tensorwise.parameter_bytes == 4 * tensorwise.parameters


def test_float8_tp_styles_go_to_converted_linears_and_their_all_float8_parents():
    """A module the plan prepares gets the float8 input preparation only when every linear
    below it is converted: with layers.0.attention.wq kept in high precision, that
    attention gathers its input in high precision, and its converted siblings cast it."""
    from torchao.float8 import convert_to_float8_training

    from plait_float8.tensor_parallel import mark_float8_styles
    from plait_llama3.spec import TP_PLAN, llama3_spec
    from plait.model_spec import TP_STYLE_CLASSES

    spec = llama3_spec()
    model = spec.build_meta(spec.args_for("debugmodel_tiny"))
    section = Float8Config(emulate=True, auto_filter=False, filter_fqns=["output", "layers.0.attention.wq"])
    chosen = {d.path for d in decide_modules(model, filter_fqns=section.filter_fqns, shape_rule=shape_rule(section))
              if d.converted}
    convert_to_float8_training(model, module_filter_fn=lambda m, path: path in chosen, config=torchao_config(section))
    marked = set(mark_float8_styles(model, TP_PLAN.styles))
    assert marked == chosen | {"layers.0.feed_forward", "layers.1.attention", "layers.1.feed_forward"}
    assert not hasattr(model.get_submodule("layers.0.attention"), TP_STYLE_CLASSES)
    classes = getattr(model.get_submodule("layers.1.attention"), TP_STYLE_CLASSES)
    assert classes["prepare_input"].__name__ == "PrepareFloat8ModuleInput"


def test_float8_tp_styles_need_tensorwise_and_e4m3fn():
    from plait_float8.tensor_parallel import why_not_float8_styles

    assert why_not_float8_styles(Float8Config(), "float8_e4m3fn") is None
    assert "scales rows" in why_not_float8_styles(Float8Config(recipe="rowwise"), "float8_e4m3fn")
    assert "float8_e4m3fn only" in why_not_float8_styles(Float8Config(), "float8_e4m3fnuz")


# --------------------------------------------------------------------------- MoE grouped experts
# torchao's rowwise grouped GEMM: on CPU the options' errors, the group alignment the plugin
# declares and the conversion of the experts' weights; numerics need a GPU with float8
# matmuls and triton (torchao has no emulation for them).

QWEN3_MOE = ["--config", "qwen3_moe_debugmodel", "--training.seq_len", "64"]


@pytest.mark.parametrize(("options", "message"), [
    ({"recipe": "tensorwise"}, "use --float8.recipe rowwise"),
    ({"recipe": "rowwise", "emulate": True}, "has no emulation"),
])
def test_grouped_experts_options_are_checked(options, message):
    with pytest.raises(ConfigError, match=message):
        Float8Config(grouped_experts=True, **options).validate()


def test_grouped_experts_need_triton_or_are_refused():
    argv = ("--plugins", "float8", "--float8.recipe", "rowwise", "--float8.grouped_experts", "True")
    try:
        import triton  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="needs triton"):
            resolved(*argv, base=QWEN3_MOE, device=simulated_device("H100"))
    else:
        job = resolved(*argv, base=QWEN3_MOE, device=simulated_device("H100"))
        assert job.needs.moe_group_alignment == 16


def test_conversion_wraps_the_expert_weights():
    from torchao.quantization import quantize_

    layer = MoE(dim=64, args=MoEArgs(num_experts=4, top_k=2, hidden_dim=64))
    quantize_(layer.experts, grouped_op_config(("float8_e4m3fnuz", "float8_e5m2fnuz")), filter_fn=lambda m, fqn: True)
    weight = layer.experts.w1.data
    assert type(weight).__name__ == "Float8TrainingWeightWrapperTensor"
    assert weight.config.float8_dtype == torch.float8_e4m3fnuz and weight.config.float8_linear_recipe == "rowwise"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torchao's float8 grouped GEMM needs a CUDA GPU with "
                    "float8 matmuls (SM 8.9+) and triton; no CPU or emulated path exists")
def test_grouped_experts_sqnr_on_gpu():
    from torchao.quantization import quantize_

    torch.manual_seed(0)
    reference = MoE(dim=256, args=MoEArgs(num_experts=4, top_k=2, hidden_dim=256)).cuda().bfloat16()
    reference.init_weights(std=0.02, out_std=0.02)
    reference.experts.implementation = "grouped_mm"
    converted = copy.deepcopy(reference)
    quantize_(converted.experts, grouped_op_config(), filter_fn=lambda m, fqn: True)
    converted.group_alignment = 16
    x = torch.randn(2, 64, 256, device="cuda", dtype=torch.bfloat16)
    outputs = []
    for layer in (reference, converted):
        inputs = x.clone().requires_grad_()
        out = layer(inputs)
        out.float().square().sum().backward()
        outputs.append((out.float(), inputs.grad.float()))
    for ref, actual in zip(*outputs):
        noise = (ref - actual).norm()
        assert 20 * torch.log10(ref.norm() / noise) >= 20.0  # the tensorwise linear bound; not measured here (no GPU)
