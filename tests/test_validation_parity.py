"""Validation loss under FSDP 2, TP 2, PP 2 and CP 2 equals one process's within 1e-5."""
import pytest

from plait.testing import run_ranks, train_in_this_process

STEPS = 3
TOLERANCE = 1e-5
LAYOUTS = {
    "fsdp2": ("fsdp", ["--parallelism.dp_shard", "2"], 2),
    "tp2": ("tp", ["--parallelism.dp_shard", "1", "--parallelism.tp", "2"], 4),
    "pp2": ("pipeline", ["--parallelism.dp_shard", "1", "--parallelism.pp", "2",
                         "--model.flavor", "debugmodel_tiny4"], 4),
    "cp2": ("fsdp,context-parallel", ["--parallelism.dp_shard", "1", "--parallelism.cp", "2"], 4),
}


def job(dump, *extra, local_batch_size, flavor="debugmodel_tiny"):
    return [
        "--config", "llama3_debugmodel",
        "--model.flavor", flavor,
        "--training.steps", str(STEPS),
        "--training.seq_len", "64",
        "--training.local_batch_size", str(local_batch_size),
        "--training.deterministic", "True",
        "--data.held_out_share", "0.1",
        "--validation.interval", "2",
        "--validation.steps", "2",
        "--checkpoint.enable", "False",
        "--metrics.progress", "off",
        "--metrics.enable_tensorboard", "False",
        "--job.pg_timeout_seconds", "90",
        "--job.dump_folder", str(dump),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """One process, for each flavor the layouts use."""
    return {
        flavor: train_in_this_process(job(tmp_path_factory.mktemp(flavor), local_batch_size=4, flavor=flavor))
        for flavor in ("debugmodel_tiny", "debugmodel_tiny4")
    }


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_validation_loss_matches_one_process(tmp_path, references, layout):
    plugins, degrees, local_batch_size = LAYOUTS[layout]
    pytest.importorskip({"fsdp": "plait_fsdp", "tp": "plait_tp", "pipeline": "plait_pipeline"}.get(
        plugins, "plait_context_parallel"))
    flavor = "debugmodel_tiny4" if layout == "pp2" else "debugmodel_tiny"
    result = run_ranks(2, job(tmp_path, "--plugins", plugins, *degrees, local_batch_size=local_batch_size),
                       tmp_path / "result.json")
    reference = references[flavor]
    assert sorted(result["validation_losses"]) == sorted(reference["validation_losses"]) == [2, 3]
    for step, loss in reference["validation_losses"].items():
        assert abs(result["validation_losses"][step] - loss) < TOLERANCE, (step, result, reference)
    for step, loss in reference["losses"].items():  # and training as usual
        assert abs(result["losses"][step] - loss) < TOLERANCE, (step, result, reference)
