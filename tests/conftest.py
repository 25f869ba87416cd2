import importlib
import os
import textwrap

import pytest


def tiny_job(tmp_path, *extra: str, steps: int = 6) -> list[str]:
    """A fast llama3 job: the tiny debug flavor on the embedded corpus."""
    return [
        "--config", "llama3_debugmodel",
        "--model.flavor", "debugmodel_tiny",
        "--training.steps", str(steps),
        "--training.seq_len", "64",
        "--training.local_batch_size", "4",
        "--lr_scheduler.warmup_steps", "2",
        "--metrics.progress", "off",
        "--job.dump_folder", str(tmp_path),
        *extra,
    ]


@pytest.fixture
def fake_plugins(tmp_path_factory, monkeypatch):
    """Install throwaway plugins on sys.path and PYTHONPATH (for subprocesses too)."""
    root = tmp_path_factory.mktemp("fake_plugins")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))

    def make(name: str, source: str) -> None:
        module = "fake_" + name.replace("-", "_")
        (root / f"{module}.py").write_text(textwrap.dedent(source))
        info = root / f"fake_{module}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fake-{name}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[plait.plugins]\n{name} = {module}\n")
        importlib.invalidate_caches()

    return make
