import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_hook_reference_is_in_sync_with_hookspecs():
    result = subprocess.run([sys.executable, str(DOCS / "generate_hook_reference.py"), "--check"])
    assert result.returncode == 0, "docs/hook-reference.md is stale: run python docs/generate_hook_reference.py"


def test_every_hook_is_documented():
    from plait import hookspecs

    text = (DOCS / "hook-reference.md").read_text()
    hooks = [name for name in dir(hookspecs) if name.startswith("plait_")]
    assert len(hooks) >= 20
    for name in hooks:
        assert f"### `{name}(" in text
