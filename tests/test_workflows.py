"""The GitHub Actions workflows and the per-backend loss baselines (docs/hardware.md, CI).

Workflows are checked two ways: their structure with PyYAML, always (every job runs on
a runner, the GPU workflow covers CUDA and ROCm with gfx942 labels, every nox session it
names exists); and against GitHub's workflow JSON schema with check-jsonschema, which
vendors the schema and runs offline, where it is installed (actionlint is a Go binary)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import loss_baseline  # noqa: E402


def _load(path: Path) -> dict:
    document = yaml.safe_load(path.read_text())
    document["on"] = document.pop(True, document.get("on"))  # YAML 1.1 reads the key `on` as True
    return document


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_workflow_structure(path):
    workflow = _load(path)
    assert workflow["name"] and workflow["on"] and workflow["jobs"], path
    for name, job in workflow["jobs"].items():
        assert job.get("runs-on"), f"{path.name}: job {name} has no runs-on"
        assert job.get("steps"), f"{path.name}: job {name} has no steps"
        for need in [job["needs"]] if isinstance(job.get("needs"), str) else job.get("needs", []):
            assert need in workflow["jobs"], f"{path.name}: job {name} needs unknown job {need}"


def test_the_gpu_workflow_runs_cuda_and_rocm_on_gfx942_with_loss_baselines():
    text = (ROOT / ".github" / "workflows" / "gpu.yml").read_text()
    workflow = _load(ROOT / ".github" / "workflows" / "gpu.yml")
    assert '"rocm": ["self-hosted", "gpu", "rocm", "gfx942"]' in text  # the sessions' runners
    assert 'for backend in ("cuda", "rocm")' in text
    baseline = workflow["jobs"]["loss-baseline"]
    runners = {row["backend"]: row["runner"] for row in baseline["strategy"]["matrix"]["include"]}
    assert runners == {"cuda": ["self-hosted", "gpu", "cuda"], "rocm": ["self-hosted", "gpu", "rocm", "gfx942"]}
    noxfile = (ROOT / "noxfile.py").read_text()
    assert 'register(f"loss-baseline{suffix}"' in noxfile and "ci-{backend}" in noxfile


@pytest.mark.skipif(shutil.which("check-jsonschema") is None,
                    reason="check-jsonschema is not installed (pip install check-jsonschema)")
def test_workflows_match_the_github_schema():
    result = subprocess.run(["check-jsonschema", "--builtin-schema", "vendor.github-workflows",
                             *map(str, WORKFLOWS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_loss_comparison_names_each_step_beyond_the_tolerance():
    baseline = {"tolerance": 1e-3, "losses": {"1": 2.0, "2": 1.5}}
    assert loss_baseline.compare(baseline, {1: 2.0005, 2: 1.5}) == []
    assert loss_baseline.compare(baseline, {1: 2.0, 2: 1.51}) == [
        "step 2: baseline 1.500000, this run 1.510000 (|difference| 1.00e-02 > 0.001)"]
    assert loss_baseline.compare(baseline, {1: 2.0}) == ["steps differ: baseline [1, 2], this run [1]"]


def test_the_cpu_debug_run_matches_its_stored_losses():
    """The device answer moved to capabilities without changing a CPU run's losses."""
    stored = json.loads((ROOT / "benchmarks" / "loss_baselines" / "cpu.json").read_text())
    assert stored["job"] == loss_baseline.JOB and stored["tolerance"] == loss_baseline.TOLERANCE["cpu"]
    assert loss_baseline.compare(stored, loss_baseline.run_debug_job("cpu")) == []
