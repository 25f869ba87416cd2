import importlib
import os
import sys
import textwrap

import pytest


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

    yield make
    for name in [m for m in sys.modules if m.startswith("fake_")]:
        del sys.modules[name]  # the next test's throwaway plugins may reuse the name
    importlib.invalidate_caches()
