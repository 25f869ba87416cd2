"""Tiny trainings in this process that log to offline W&B runs, read back from wandb's files."""
import importlib.util

import pytest

from plait.cli import train
from plait.testing import run_ranks

from wandb_files import OfflineRun, offline_job, offline_runs


def test_offline_run_logs_losses_config_and_a_resume_continues_it(tmp_path, wandb_env):
    run_folder = tmp_path / "my-run"
    common = ["--checkpoint.interval", "3",
              "--validation.interval", "3", "--validation.steps", "1", "--data.held_out_share", "0.2"]
    first = train(offline_job(run_folder, *common, "--wandb.tags", "tiny", "smoke", "--wandb.group", "g1"))
    (folder,) = offline_runs(wandb_env)
    logged = OfflineRun(folder)
    assert logged.series("loss") == first.losses  # every step, bit for bit
    assert logged.series("grad_norm") == first.grad_norms
    assert logged.series("validation/loss") == first.validation_losses
    assert set(logged.history[2]) >= {"lr", "throughput/tps", "memory/peak_gib"}  # TensorBoard's names
    assert (logged.name, logged.project, logged.group, logged.tags) == ("my-run", "plait", "g1", ["tiny", "smoke"])
    assert logged.config["plugins"] == ["llama3", "wandb"]
    assert logged.config["training"]["steps"] == 3 and logged.config["model"]["flavor"] == "debugmodel_tiny"
    assert logged.config["wandb"]["mode"] == "offline"
    assert logged.exit_code == 0  # finished at the last save point

    resumed = train(offline_job(run_folder, *common, steps=5))
    assert sorted(resumed.losses) == [4, 5]
    later = [OfflineRun(f) for f in offline_runs(wandb_env) if f != folder]
    assert [run.run_id for run in later] == [logged.run_id]  # the checkpoint kept the id
    assert later[0].series("loss") == resumed.losses
    assert later[0].config["training"]["steps"] == 5
    assert later[0].exit_code == 0


def test_disabled_mode_trains_and_writes_nothing(tmp_path, wandb_env):
    result = train(offline_job(tmp_path / "run", "--wandb.mode", "disabled", "--checkpoint.enable", "False",
                               steps=2))
    assert sorted(result.losses) == [1, 2]
    assert offline_runs(wandb_env) == [] and not (wandb_env / "wandb").exists()


@pytest.mark.skipif(importlib.util.find_spec("plait_fsdp") is None, reason="needs plait-fsdp for two ranks")
def test_all_ranks_opens_one_run_per_rank_in_one_group(tmp_path, wandb_env):
    """Two gloo ranks, which leave with os._exit: each rank's run must be finished by then."""
    argv = offline_job(tmp_path / "two", "--parallelism.dp_shard", "2", "--checkpoint.enable", "False",
                       "--wandb.all_ranks", "True")
    argv[argv.index("wandb")] = "wandb,fsdp"
    result = run_ranks(2, argv, tmp_path / "out.json")
    runs = {run.run_id: run for run in map(OfflineRun, offline_runs(wandb_env))}
    assert len(runs) == 2, sorted(runs)
    (base,) = [run_id for run_id in runs if "-rank" not in run_id]
    rank0, rank1 = runs[base], runs[f"{base}-rank1"]
    assert rank0.series("loss") == result["losses"]
    assert sorted(rank1.series("loss")) == [1, 2, 3]  # rank 1's own loss
    assert (rank0.name, rank1.name) == ("two-rank0", "two-rank1")
    assert rank0.group == rank1.group == "two"
    assert rank0.config["rank"] == 0 and rank1.config["rank"] == 1
    assert rank0.exit_code == rank1.exit_code == 0
