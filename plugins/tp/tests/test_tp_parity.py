"""Tensor parallelism: validation messages, plan matching, and loss parity of a 2-rank TP
run with a single-process run that starts from the same Hugging Face weights."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from plait.config import JobConfig
from plait.errors import ConfigError
from plait.parallel_dims import ParallelDims
from plait.capabilities import simulated_device
from plait.testing import check_plugins, run_ranks
from plait_llama3.spec import TP_PLAN, llama3_spec
from plait_tp import plugin
from plait_tp.plan import StyleOptions, build_style, pattern_matches, resolve_plan

STEPS = 6  # the TP run resumes after step 1 and trains 5 steps


def llama_job(dump: Path, *extra: str) -> list[str]:
    return [
        "--config", "llama3_debugmodel",
        "--model.flavor", "debugmodel_tiny",
        "--training.steps", str(STEPS),
        "--training.seq_len", "64",
        "--training.local_batch_size", "4",
        "--lr_scheduler.warmup_steps", "2",
        "--optimizer.lr", "1e-2",
        "--training.max_norm", "0.3",  # below the grad norm of the first steps (about 0.6): clipping acts
        "--checkpoint.interval", "1",
        "--checkpoint.keep_latest_k", "0",
        "--metrics.progress", "off",
        "--job.dump_folder", str(dump),
        *extra,
    ]  # fmt: skip


def run_two_tp_ranks(tmp_path: Path, argv: list[str]) -> dict[int, float]:
    return run_ranks(2, argv, tmp_path / "losses.json")["losses"]


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """The reference run, and the folder holding its checkpoint after step 1."""
    from plait.cli import train

    dump = tmp_path_factory.mktemp("single")
    return dump, train(llama_job(dump)).losses


@pytest.mark.parametrize(
    "options",
    [
        pytest.param([], id="sp+loss_parallel"),
        pytest.param(["--tp.sequence_parallel", "False", "--tp.loss_parallel", "False"], id="plain"),
    ],
)
def test_two_tp_ranks_match_one_process(tmp_path, single_process_run, options):
    """Both runs continue from the same step-1 checkpoint (the TP run reshards it), so
    the weights they start from are identical whatever the initialization does."""
    single_dump, single_losses = single_process_run
    shutil.copytree(single_dump / "checkpoint" / "step-1", tmp_path / "checkpoint" / "step-1")
    argv = llama_job(
        tmp_path,
        "--plugins", "tp",
        "--parallelism.tp", "2",
        "--parallelism.dp_shard", "1",
        "--job.pg_timeout_seconds", "90",
        *options,
    )  # fmt: skip
    tp_losses = run_two_tp_ranks(tmp_path, argv)
    assert sorted(tp_losses) == list(range(2, STEPS + 1))
    assert tp_losses[STEPS] < tp_losses[2]  # it trains
    for step in range(2, STEPS + 1):
        assert tp_losses[step] == pytest.approx(single_losses[step], abs=1e-5), (step, tp_losses, single_losses)


def test_compiled_blocks_and_loss_under_tp_match_one_process(tmp_path, single_process_run):
    """Per-block compile with sequence and loss parallelism. Two torch behaviours broke this:
    the embedding's in-flight collective reached the first compiled block (its backward
    failed), and a compiled loss on vocabulary-sharded logits ignored loss parallelism
    (it returned the local shard's loss, 14.2 instead of 8.1)."""
    single_dump, single_losses = single_process_run
    shutil.copytree(single_dump / "checkpoint" / "step-1", tmp_path / "checkpoint" / "step-1")
    argv = llama_job(tmp_path, "--plugins", "tp", "--parallelism.tp", "2", "--parallelism.dp_shard", "1",
                     "--job.pg_timeout_seconds", "180", "--compile.enable", "True")
    tp_losses = run_two_tp_ranks(tmp_path, argv)
    assert sorted(tp_losses) == list(range(2, STEPS + 1))
    for step in range(2, STEPS + 1):
        assert tp_losses[step] == pytest.approx(single_losses[step], abs=1e-5), (step, tp_losses, single_losses)


# ------------------------------------------------------------------------- validation


def _config(flavor: str = "debugmodel_tiny", **tp_options: bool) -> JobConfig:
    config = JobConfig()
    config.model.name = "llama3"
    config.model.flavor = flavor
    config.tp = plugin.TPConfig(**tp_options)  # the section the CLI adds when tp is enabled
    return config


def _validate(config: JobConfig, tp: int, spec=None, device: str = "cpu") -> None:
    dims = ParallelDims(tp=tp, dp_shard=1, world_size=tp)
    check_plugins(plugin, config=config, parallel_dims=dims, model_spec=spec or llama3_spec(),
                  device=simulated_device(device))


def test_sequence_parallelism_cuts_each_sequence_into_tp_shards():
    with pytest.raises(ConfigError, match=r"seq_len 31 must be a multiple of 2: sequence parallelism .tp = 2"):
        _validate(_with_seq_len(_config(), 31), tp=2)
    _validate(_with_seq_len(_config(sequence_parallel=False), 31), tp=2)  # no split without it


def _with_seq_len(config: JobConfig, seq_len: int) -> JobConfig:
    config.training.seq_len = seq_len
    return config


def test_tp_that_does_not_divide_the_heads_is_refused_with_valid_degrees():
    # debugmodel_tiny: 4 heads, 2 kv heads, ffn 192
    with pytest.raises(ConfigError, match=r"tp 3 does not divide n_heads = 4 .*valid: 1, 2\)"):
        _validate(_config(), tp=3)
    with pytest.raises(ConfigError, match=r"tp 4 does not divide kv_heads = 2 .*valid: 1, 2\)"):
        _validate(_config(), tp=4)
    _validate(_config(), tp=2)


def test_model_without_tp_plan_is_refused_by_name():
    spec = llama3_spec()
    spec.name = "planless"
    spec.tp_plan = None
    with pytest.raises(ConfigError, match="model 'planless' declares no tensor-parallel plan"):
        _validate(_config(), tp=2, spec=spec)


def test_unknown_plan_style_is_refused_before_any_work():
    from plait.model_spec import TPPlan

    spec = llama3_spec()
    spec.tp_plan = TPPlan(styles={**TP_PLAN.styles, "output": "diagonal"}, divisible_by_tp=("n_heads",))
    with pytest.raises(ConfigError, match="unknown style.* diagonal"):
        _validate(_config(), tp=2, spec=spec)


def test_a_plan_that_misses_parameters_is_refused_naming_them():
    from plait.model_spec import TPPlan

    spec = llama3_spec()
    styles = {k: v for k, v in TP_PLAN.styles.items() if k not in ("layers.*.ffn_norm", "norm")}
    spec.tp_plan = TPPlan(styles=styles, divisible_by_tp=TP_PLAN.divisible_by_tp)
    expected = (r"does not cover 3 parameter\(s\): layers\.\*\.ffn_norm\.weight, norm\.weight\. "
                r".*'replicate'.*--parallelism\.tp 1")
    with pytest.raises(ConfigError, match=expected):
        _validate(_config(), tp=2, spec=spec)
    spec.tp_plan = TPPlan(styles={**styles, "norm": "replicate", "layers.*.ffn_norm": "sequence_parallel"},
                          divisible_by_tp=TP_PLAN.divisible_by_tp)
    _validate(_config(), tp=2, spec=spec)


def test_every_model_package_plan_covers_its_model():
    from plait.plugins import load_model_spec
    from plait_tp.plan import uncovered_parameters

    for name in ("llama3", "qwen3", "deepseek_v3"):
        spec = load_model_spec(name)
        for flavor in ("debugmodel", "debugmodel_moe") if name == "qwen3" else ("debugmodel",):
            with torch.device("meta"):
                model = spec.build(spec.args_for(flavor))
            plan = spec.tp_plan
            assert uncovered_parameters(model, plan.styles, plan.extra_covers) == [], (name, flavor)


def test_sequence_parallelism_refuses_learned_positions():
    spec = llama3_spec()
    spec.sequence_indexed_parameters = ("pos_embedding.weight",)
    with pytest.raises(ConfigError, match=r"pos_embedding\.weight.*add --tp\.sequence_parallel False"):
        _validate(_config(), tp=2, spec=spec)
    _validate(_config(sequence_parallel=False), tp=2, spec=spec)


def test_tied_embeddings_are_refused():
    import dataclasses

    spec = llama3_spec()
    tied = dataclasses.replace(spec.args_for("debugmodel_tiny"), tie_word_embeddings=True)
    spec.flavors = {**spec.flavors, "tied": tied}
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        _validate(_config("tied"), tp=2, spec=spec)


@pytest.mark.parametrize("device", ["cpu", "A100"])
def test_async_tp_without_symmetric_memory_is_refused(device):
    with pytest.raises(ConfigError, match=r"lacks: plugin 'plait_tp.plugin' needs symmetric_memory \(drop --tp.async_tp\)"):
        _validate(_config(async_tp=True), tp=2, device=device)


def test_async_tp_without_compile_is_refused():
    with pytest.raises(ConfigError, match="add --compile.enable"):
        _validate(_config(async_tp=True), tp=2, device="H100")
    compiled = _config(async_tp=True)
    compiled.compile.enable = True
    _validate(compiled, tp=2, device="H100")


def test_tp_one_needs_nothing():
    spec = llama3_spec()
    spec.tp_plan = None
    _validate(_config(async_tp=True), tp=1, spec=spec)


# ------------------------------------------------------------------------- plan


def test_patterns_match_one_component_per_star():
    assert pattern_matches("layers.*.attention.wq", "layers.0.attention.wq")
    assert not pattern_matches("layers.*.attention", "layers.0.attention.wq")
    assert not pattern_matches("layers.*", "layers.0.attention")
    assert not pattern_matches("norm", "layers.0.attention_norm")


def test_llama_plan_resolves_against_real_module_paths():
    spec = llama3_spec()
    with torch.device("meta"):
        model = spec.build(spec.args_for("debugmodel_tiny"))
    resolved = resolve_plan((name for name, _ in model.named_modules() if name), TP_PLAN.styles)
    assert resolved["tok_embeddings"] == "embedding"
    assert resolved["output"] == "output"
    assert resolved["norm"] == "sequence_parallel"
    assert resolved["layers.1.attention"] == "prepare_input"
    assert resolved["layers.1.attention.wo"] == "rowwise"
    assert resolved["layers.0.feed_forward.w3"] == "colwise"
    assert "layers.0.attention.sdpa" not in resolved and "layers.0" not in resolved
    assert len(resolved) == 3 + 2 * 11


def test_ambiguous_plan_is_refused():
    with pytest.raises(ConfigError, match="several styles"):
        resolve_plan(["layers.0.wq"], {"layers.*.wq": "colwise", "layers.0.*": "rowwise"})


def test_styles_follow_sequence_and_loss_parallel_options():
    from torch.distributed.tensor import Replicate, Shard

    sp = StyleOptions(sequence_parallel=True, loss_parallel=True)
    plain = StyleOptions(sequence_parallel=False, loss_parallel=False)
    assert build_style("rowwise", sp).output_layouts == (Shard(1),)
    assert build_style("rowwise", plain).output_layouts == (Replicate(),)
    output = build_style("output", sp)
    assert output.output_layouts == (Shard(-1),) and not output.use_local_output
    assert build_style("output", plain).use_local_output
    assert build_style("prepare_input", plain) is None
    assert type(build_style("sequence_parallel", plain)).__name__ == "ReplicatedParameters"
    with pytest.raises(ConfigError, match="unknown tensor-parallel style 'diagonal'"):
        build_style("diagonal", sp)  # type: ignore[arg-type]


def test_a_module_can_ask_for_its_own_style_classes():
    """``TP_STYLE_CLASSES`` on a module replaces torch's class for that style, with the
    same arguments; other styles keep torch's."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel

    class MyRowwise(RowwiseParallel):
        pass

    class MyPrepare(PrepareModuleInput):
        pass

    classes = {"rowwise": MyRowwise, "prepare_input": MyPrepare}
    sp = StyleOptions(sequence_parallel=True)
    rowwise = build_style("rowwise", sp, classes)
    assert type(rowwise) is MyRowwise and rowwise.output_layouts == (Shard(1),)
    prepare = build_style("prepare_input", sp, classes)
    assert type(prepare) is MyPrepare and prepare.desired_input_layouts == (Replicate(),)
    assert type(build_style("colwise", sp, classes)) is ColwiseParallel
