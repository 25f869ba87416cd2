"""`plait plan`: the real meshes and parallelized model of a run at any world size, built in
one process over a fake process group, with memory measured on fake tensors."""
import json

import pytest
import torch

from plait.cli import main, resolve_train_config
from plait.memory_watch import MemoryWatch
from plait.plan import plan
from plait.step import token_cross_entropy

pytest.importorskip("plait_fsdp")
pytest.importorskip("plait_tp")

TINY = ["--config", "llama3_debugmodel", "--model.flavor", "debugmodel_tiny",
        "--training.seq_len", "64", "--training.local_batch_size", "2"]  # fmt: skip


def planned(world_size, *argv, ranks=None):
    return plan(resolve_train_config(list(argv), world_size=world_size, prog="plait plan"), ranks=ranks)


def run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_one_process_plan_matches_a_real_step():
    result = planned(1, *TINY)
    job = resolve_train_config(TINY, world_size=1)
    torch.manual_seed(0)
    model = job.spec.build(job.model_args)
    tokens = torch.randint(0, 2048, (2, 65))
    with MemoryWatch() as watch:
        watch.adopt([*model.parameters(), *model.buffers()])
        before = watch.live_bytes
        watch.reset_peak()
        (token_cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]) / 1).backward()  # as the step: / accumulation
    rank = result.ranks[0]
    assert rank.parameters == sum(p.numel() for p in model.parameters()) == result.total_parameters
    assert rank.parameter_bytes == rank.gradient_bytes == rank.parameters * 4
    assert rank.optimizer_bytes == 2 * rank.parameter_bytes  # AdamW: two moments
    assert rank.step_peak_bytes == watch.peak_bytes - before


def test_activation_checkpointing_lowers_the_step_peak():
    peaks = {
        mode: planned(1, *TINY, "--activation_checkpoint.mode", mode).ranks[0].step_peak_bytes
        for mode in ("none", "selective", "full")
    }
    assert peaks["full"] < peaks["selective"] < peaks["none"], peaks


def test_fsdp_shards_of_all_ranks_add_up_to_the_model():
    result = planned(4, *TINY, "--plugins", "fsdp", "--parallelism.dp_shard", "4", ranks=[0, 1, 2, 3])
    assert sum(rank.parameters for rank in result.ranks) == result.total_parameters
    assert result.ranks[0].parameters >= result.total_parameters / 4  # rank 0 carries the padding
    assert result.meshes["dp_shard"] == 4


def test_hsdp_x_tp_builds_a_3d_layout():
    result = planned(16, *TINY, "--plugins", "fsdp,tp", "--parallelism.dp_replicate", "2",
                     "--parallelism.dp_shard", "4", "--parallelism.tp", "2")
    assert result.meshes == {"world": 16, "dp_replicate": 2, "dp_shard": 4, "tp": 2, "dp": 8,
                             "dp_shard_cp": 4, "dp_cp": 8}  # fmt: skip
    rank = result.ranks[0]
    # Sharded 8 ways (4 FSDP × 2 TP), except the norms, which TP replicates.
    assert result.total_parameters / 8 <= rank.parameters < result.total_parameters / 8 * 1.05
    assert result.tokens_per_step == 2 * 64 * 8
    assert rank.step_peak_bytes > 0


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--plugins", "fsdp,tp", "--parallelism.dp_shard", "3", "--parallelism.tp", "2"],
         "but the world size is 8"),
        (["--plugins", "fsdp,tp", "--parallelism.tp", "8"], "--parallelism.tp 8"),
        (["--plugins", "fsdp", "--parallelism.tp", "2"], "add tp to --plugins"),
    ],
)
def test_invalid_layouts_fail_as_they_would_on_hardware(capsys, argv, expected):
    code, output = run(["plan", "--world-size", "8", *TINY, *argv], capsys)
    assert code == 2, output
    assert expected in output


def test_plan_needs_a_world_size(capsys):
    code, output = run(["plan", *TINY], capsys)
    assert code == 2
    assert "--world-size N" in output


def test_llama3_405b_on_512_ranks(tmp_path, capsys):
    """The published 405B recipe, FSDP 64 × TP 8, full activation checkpointing."""
    report = tmp_path / "plan.json"
    code, output = run(["plan", "--world-size", "512", "--json", str(report), "--device-memory-gib", "80",
                        "--config", "llama3_405b", "--plugins", "fsdp,tp", "--parallelism.dp_shard", "64",
                        "--parallelism.tp", "8", "--activation_checkpoint.mode", "full"], capsys)
    assert code == 0, output
    result = json.loads(report.read_text())
    rank = result["ranks"][0]
    assert result["total_parameters"] > 405e9
    assert result["total_parameters"] / 512 <= rank["parameters"] < result["total_parameters"] / 512 * 1.01
    assert result["tokens_per_step"] == 64 * 8192
    assert rank["optimizer_bytes"] == 2 * rank["gradient_bytes"] == 2 * 4 * rank["parameters"]
    assert 0 < rank["peak_bytes"] < 80 * 2**30
    assert "fits in 80 GiB: yes" in output


def test_pipeline_stages_are_planned_with_the_schedules_microbatches_in_flight():
    pytest.importorskip("plait_pipeline")
    tiny4 = ["--config", "llama3_debugmodel", "--model.flavor", "debugmodel_tiny4", "--training.seq_len", "64",
             "--training.local_batch_size", "8", "--plugins", "pipeline,tp", "--parallelism.pp", "2",
             "--parallelism.tp", "2"]  # fmt: skip
    gpipe = planned(4, *tiny4, "--pipeline.schedule", "GPipe")
    one_f_one_b = planned(4, *tiny4, "--pipeline.schedule", "1F1B")
    assert [rank.rank for rank in gpipe.ranks] == [0, 2]  # the first rank of each stage
    assert [rank.pp_rank for rank in gpipe.ranks] == [0, 1]
    assert gpipe.ranks[0].parameters + gpipe.ranks[1].parameters > gpipe.total_parameters / 2  # tp halves, norms stay
    for gpipe_rank, one_f_one_b_rank in zip(gpipe.ranks, one_f_one_b.ranks):
        # GPipe holds all 8 microbatches' activations before the first backward; 1F1B at most 2 here
        assert gpipe_rank.step_peak_bytes > one_f_one_b_rank.step_peak_bytes > 0
        assert gpipe_rank.parameter_bytes == one_f_one_b_rank.parameter_bytes


def test_moe_model_under_pipeline_and_expert_parallelism():
    pytest.importorskip("plait_pipeline")
    pytest.importorskip("plait_ep")
    pytest.importorskip("plait_deepseek_v3")
    result = planned(4, "--config", "deepseek_v3_debugmodel", "--training.seq_len", "64",
                     "--training.local_batch_size", "4", "--plugins", "pipeline,ep,fsdp", "--parallelism.pp", "2",
                     "--parallelism.dp_shard", "2", "--parallelism.ep", "2")  # fmt: skip
    assert result.meshes["ep"] == 2 and result.meshes["pp"] == 2
    assert [rank.pp_rank for rank in result.ranks] == [0, 1]
    assert all(rank.step_peak_bytes > 0 for rank in result.ranks)
    # every stage holds its share of the experts: half of them per ep rank
    assert sum(rank.parameters for rank in result.ranks) < result.total_parameters
