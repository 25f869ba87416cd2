"""Writes docs/hook-reference.md from plait.hookspecs (the single source of truth).

    python docs/generate_hook_reference.py            # rewrite the file
    python docs/generate_hook_reference.py --check    # exit 1 if it is out of date
"""
from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

from plait import hookspecs

TARGET = Path(__file__).with_name("hook-reference.md")


def _stages(source: str) -> list[tuple[str, list[str]]]:
    """(banner title, hook names) in file order; banners are the `# N. Title` comment blocks."""
    stages: list[tuple[str, list[str]]] = []
    lines = source.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("# ---") and index + 1 < len(lines) and re.match(r"# \d", lines[index + 1]):
            title = lines[index + 1][2:]
            following = index + 2
            while lines[following].startswith("#    "):
                title += " " + lines[following][5:].strip()
                following += 1
            stages.append((title, []))
        match = re.match(r"def (plait_\w+)\(", line)
        if match and stages:
            stages[-1][1].append(match.group(1))
    return stages


def render() -> str:
    source = inspect.getsource(hookspecs)
    out = [
        "# Hook reference",
        "",
        "Generated from `core/src/plait/hookspecs.py` by `docs/generate_hook_reference.py`;",
        "a test fails when this file and the module disagree. The core calls the stages in this",
        "order during a run.",
        "",
        inspect.cleandoc(hookspecs.__doc__ or ""),
        "",
    ]
    for title, names in _stages(source):
        out += [f"## {title}", ""]
        for name in names:
            function = getattr(hookspecs, name)
            options = function.plait_spec if hasattr(function, "plait_spec") else {}
            flags = [k for k in ("firstresult", "historic") if options.get(k)]
            signature = str(inspect.signature(function)).replace("'", "")
            out += [f"### `{name}{signature}`", ""]
            if flags:
                out += [f"*{', '.join(flags)}*", ""]
            out += [inspect.cleandoc(function.__doc__ or ""), ""]
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if TARGET.read_text() == text else 1)
    TARGET.write_text(text)
