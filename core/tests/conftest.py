import importlib
import sys
import textwrap

import pytest


@pytest.fixture
def make_plugin(tmp_path, monkeypatch):
    """Install a throwaway plugin distribution (dist-info + module) on sys.path."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(name: str, source: str, *, dist: str | None = None, version: str = "0.1",
             recipes: tuple[str, ...] = ()) -> str:
        module = "fake_" + name.replace("-", "_")
        dist = dist or f"fake-{name}"
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        info = tmp_path / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        entry_points = f"[plait.plugins]\n{name} = {module}\n"
        if recipes:
            entry_points += "[plait.recipes]\n" + "".join(f"{r} = {module}:{r}\n" for r in recipes)
        (info / "entry_points.txt").write_text(entry_points)
        importlib.invalidate_caches()
        return module

    yield make
    for name in [m for m in sys.modules if m.startswith("fake_")]:
        del sys.modules[name]  # the next test's throwaway plugins may reuse the name
    importlib.invalidate_caches()
