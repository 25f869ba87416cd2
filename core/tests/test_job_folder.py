"""RunNeeds.job_folder / writes_checkpoints: jobs of one run sharing a dump folder."""
from __future__ import annotations

import pytest
from plait.config import JobConfig
from plait.errors import ConfigError
from plait.job import place_job_outputs
from plait.train_state import RunNeeds


def test_a_job_folder_places_the_outputs_and_keeps_the_run_checkpoint_folder(tmp_path):
    config = JobConfig()
    config.job.dump_folder = str(tmp_path)
    needs = RunNeeds.combine([RunNeeds(job_folder="replica_1", writes_checkpoints=False), RunNeeds()])
    assert not needs.writes_checkpoints
    place_job_outputs(config, needs)
    assert config.job.dump_folder == str(tmp_path / "replica_1")
    assert config.checkpoint.folder == str(tmp_path / "checkpoint")
    place_job_outputs(config, needs)  # a saved config of the job, resolved again: unchanged
    assert config.job.dump_folder == str(tmp_path / "replica_1")
    assert RunNeeds.combine([RunNeeds()]).writes_checkpoints


def test_two_plugins_placing_the_job_differently_is_refused():
    with pytest.raises(ConfigError, match="outputs in different folders.*a: x; b: y"):
        RunNeeds.combine([RunNeeds(job_folder="x", reason="a"), RunNeeds(job_folder="y", reason="b")])
