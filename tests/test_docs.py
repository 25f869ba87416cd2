"""The docs cannot go stale silently: every repository path, package name, command,
option and hook a doc names must exist.

Checked in docs/*.md and every README.md of the repository (not in .nox/, *.egg-info or
other hidden or generated folders):

- markdown links to files (and to a heading of a markdown file) and repository paths
  (``core/src/...``, ``docs/x.md``, ``plugins/tp/README.md``, ``tests/test_x.py``, globs),
  resolved from the repository root or from the doc's folder; paths inside an in-repo
  import package (``plait_tp/moe.py``) resolved in its ``src/``;
- distribution names ``plait-xxx``: an in-repo package, or a planned one from ``PLANNED``
  on a line or paragraph that says "planned";
- ``plait <command>`` in code: a command of ``plait.cli.COMMANDS``;
- ``--section.field[.sub]`` options: a field of the core config tree or of an installed
  plugin's section (a section the doc's own example code registers is the example's);
- ``--plugins a,b``: installed plugins or planned ones;
- ``plait_xxx(`` hook names: hooks of ``plait.hookspecs``;
- no citation of "DESIGN §" (a document outside the repository); a field in
  ``NOT_YET_USED`` is named only beside the words "not yet used".

No torch import: the config dataclasses and the plugins' light modules are enough.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
import subprocess
import sys
import typing
from functools import cache
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]

#: Packages the docs may name before they exist: each mention must say "planned".
PLANNED: set[str] = set()

#: Names that stand for any name, or show an error on purpose.
PLACEHOLDER_OPTIONS = {
    "--section.field",  # the form of every option
    "--training.step",  # configuration.md: a misspelled option and its error
}
PLACEHOLDER_PLUGINS = {"a", "b"}  # --plugins a,b

#: Declared but not used by the trainer yet: a doc that names one must say "not yet used".
NOT_YET_USED: set[str] = set()

_TOP_LEVEL = r"(?:core|plugins|models|experiments|tests|docs|benchmarks|constraints|\.github|\.ci)"
_PATH = re.compile(rf"(?<![\w./@-])(?:\./)?({_TOP_LEVEL}/[\w.*{{}},/-]*|noxfile\.py)")
_PACKAGE_PATH = re.compile(r"(?<![\w./-])((plait|plait_\w+)/[\w/.-]*\w\.(?:py|json|md|txt))")
_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
_DISTRIBUTION = re.compile(r"(?<![\w/.-])plait-[a-z0-9]+(?:-[a-z0-9]+)*(?![\w/-])")
_COMMAND = re.compile(r"(?:^|[;&|(]\s*|\$\s+)plait\s+([a-z][\w-]*)")
_OPTION = re.compile(r"(?<![\w-])--([a-z_][\w-]*)\.([\w.-]*\w)")
_PLUGINS_OPTION = re.compile(r"--plugins[ =]([\w,-]+)")
_HOOK_CALL = re.compile(r"(?<![\w.])(plait_\w+)\(")
_REGISTERED_SECTION = re.compile(r"""register\(\s*["'](\w+)["']""")
_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`([^`\n]+)`")


def _skip_folder(name: str) -> bool:
    generated = {"__pycache__", "build", "dist", "node_modules"}
    return name.startswith(".") or name.endswith(".egg-info") or name in generated


def doc_files() -> list[Path]:
    docs = sorted((ROOT / "docs").glob("*.md"))
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = sorted(name for name in subfolders if not _skip_folder(name))
        if "README.md" in files:
            docs.append(Path(folder) / "README.md")
    return docs


@cache
def pyprojects() -> list[tuple[Path, dict]]:
    found = []
    for folder in ("core", *(f"{group}/*" for group in ("plugins", "models", "experiments"))):
        for path in sorted(ROOT.glob(f"{folder}/pyproject.toml")):
            found.append((path.parent, tomllib.loads(path.read_text())))
    return found


@cache
def distributions() -> frozenset[str]:
    return frozenset(project["project"]["name"] for _, project in pyprojects())


@cache
def import_packages() -> dict[str, Path]:
    """In-repo import package name -> its folder."""
    return {
        package.name: package
        for folder, _ in pyprojects()
        for package in (folder / "src").glob("*")
        if (package / "__init__.py").is_file()
    }


@cache
def repo_plugin_names() -> tuple[str, ...]:
    return tuple(
        name
        for _, project in pyprojects()
        for name in project["project"].get("entry-points", {}).get("plait.plugins", {})
    )


@cache
def config_sections() -> dict[str, type]:
    """Every --section of the core config tree and of the repository's plugins."""
    from plait.config import JobConfig
    from plait.plugins import PluginManager

    sections = {name: field.type for name, field in _fields(JobConfig).items()}
    manager = PluginManager()
    manager.enable(list(repo_plugin_names()))  # every in-repo plugin is installed where tests/ runs
    sections.update(manager.config_sections)
    return sections


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls)}
    for name, field in fields.items():
        field.type = hints.get(name, field.type)
    return fields


def option_exists(section: str, path: str) -> bool:
    current: object = config_sections().get(section.replace("-", "_"))
    if current is None:
        return False
    for part in path.replace("-", "_").split("."):
        if dataclasses.is_dataclass(current):
            field = _fields(current).get(part)  # type: ignore[arg-type]
            if field is None:
                return False
            current = field.type
        elif typing.get_origin(current) is dict or current in (dict, typing.Any):
            return True  # a mapping field (--model.args.FIELD): any key
        else:
            return False
    return True


@cache
def commands() -> frozenset[str]:
    from plait.cli import COMMANDS

    return frozenset(COMMANDS)


@cache
def hooks() -> frozenset[str]:
    source = (ROOT / "core/src/plait/hookspecs.py").read_text()
    return frozenset(re.findall(r"^def (plait_\w+)\(", source, re.MULTILINE))


def github_anchor(heading: str) -> str:
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(markdown: Path) -> set[str]:
    text = _FENCE.sub("", markdown.read_text())
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, re.MULTILINE)}


def _expand_braces(path: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", path)
    if not match:
        return [path]
    head, tail = path[: match.start()], path[match.end() :]
    return [expanded for choice in match.group(1).split(",") for expanded in _expand_braces(head + choice + tail)]


def path_exists(path: str, doc: Path) -> bool:
    path = path.rstrip(".,:;")
    for candidate in _expand_braces(path):
        found = False
        for base in (ROOT, doc.parent):
            pattern = str(base / candidate)
            if glob.glob(pattern) if any(c in candidate for c in "*?[") else os.path.exists(pattern):
                found = True
                break
        if not found:
            return False
    return True


def _paragraph(text: str, position: int) -> str:
    start = text.rfind("\n\n", 0, position) + 1
    end = text.find("\n\n", position)
    return text[start : None if end < 0 else end].replace("\n", " ").lower()


def _line_or_paragraph_says_planned(text: str, position: int) -> bool:
    line = text[text.rfind("\n", 0, position) + 1 :].split("\n", 1)[0]
    if line.lstrip().startswith("|"):  # a table row speaks for itself
        return "planned" in line.lower()
    return "planned" in _paragraph(text, position)


def problems_of(doc: Path) -> list[str]:
    text = doc.read_text()
    code_blocks = [m.group(0) for m in _FENCE.finditer(text)]
    prose = _FENCE.sub("", text)
    inline_code = _INLINE_CODE.findall(prose)
    code_lines = [line for block in code_blocks for line in block.splitlines()[1:-1]] + inline_code
    example_sections = set(_REGISTERED_SECTION.findall("\n".join(code_blocks)))
    # the entry points of an example package in the doc's own code: name = "pkg.plugin"
    entry_point = re.compile(r'\s*([\w-]+)\s*=\s*"[\w.]+\.plugin"\s*$')
    example_plugins = {match.group(1) for line in code_lines if (match := entry_point.match(line))}
    found: list[str] = []

    for target in _LINK.findall(prose):
        if re.match(r"[a-z][\w+.-]*:", target) or target.startswith("#"):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (doc.parent / file_part).resolve()
        if not resolved.exists():
            found.append(f"link to a missing file: {target}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            found.append(f"link to a missing heading: {target}")
    for match in _PATH.finditer(re.sub(r"\]\([^)]*\)|https?://\S+", "", text)):
        if not path_exists(match.group(1), doc):
            found.append(f"missing repository path: {match.group(1)}")
    for match in _PACKAGE_PATH.finditer(text):
        folder = import_packages().get(match.group(2))
        if folder is not None and not (folder.parent / match.group(1)).exists():
            found.append(f"missing file of package {match.group(2)}: {match.group(1)}")
    for match in _DISTRIBUTION.finditer(text):
        name = match.group(0)
        if name in PLANNED:
            if not _line_or_paragraph_says_planned(text, match.start()):
                found.append(f"{name} is not built yet: say it is planned where it is named")
        elif name not in distributions():
            found.append(f"no package named {name} in the repository")
    for line in code_lines:
        for match in _COMMAND.finditer(line.strip()):
            if match.group(1) not in commands():
                found.append(f"no command `plait {match.group(1)}`")
    for section, path in _OPTION.findall(text):
        if f"--{section}.{path}" in PLACEHOLDER_OPTIONS or section in example_sections:
            continue
        if not option_exists(section, path):
            found.append(f"no option --{section}.{path}")
    installed = set(repo_plugin_names())
    planned_plugins = {name.removeprefix("plait-") for name in PLANNED}
    for names in _PLUGINS_OPTION.findall(text):
        for name in filter(None, names.split(",")):
            if name not in installed | planned_plugins | example_plugins | PLACEHOLDER_PLUGINS:
                found.append(f"no plugin {name!r} (in --plugins {names})")
    for name in _HOOK_CALL.findall(text):
        if name not in hooks() and name not in import_packages():
            found.append(f"no hook {name}")
    for name in NOT_YET_USED:
        for match in re.finditer(rf"\b{name}\b", text):
            if "not yet used" not in _paragraph(text, match.start()):
                found.append(f"{name} is not used by the trainer yet: say so where it is named")
    if re.search(r"DESIGN(\.md)? ?§", text):
        found.append("cites DESIGN §, a document outside the repository")
    return sorted(set(found))


@pytest.mark.parametrize("doc", doc_files(), ids=lambda doc: str(doc.relative_to(ROOT)))
def test_doc_names_only_what_exists(doc: Path) -> None:
    problems = problems_of(doc)
    assert not problems, f"{doc.relative_to(ROOT)}:\n  " + "\n  ".join(problems)


def test_the_checks_catch_stale_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "PLANNED", {"plait-someday"})  # a package not built yet
    doc = tmp_path / "README.md"
    doc.write_text(
        "See [the guide](docs/nowhere.md) and `core/src/plait/gone.py`; install plait-gone\n"
        "and plait-someday.\n\n"
        "```bash\nplait frobnicate --training.nonsense 3 --tp.sequence_parallel True --plugins fsdp,nope\n```\n"
        "Implement `plait_no_such_hook(ctx)`. See DESIGN §4.\n"
        "[Order](" + os.path.relpath(ROOT / "docs/plugins.md", tmp_path) + "#no-such-heading), `plait_tp/gone.py`.\n"
    )
    assert problems_of(doc) == sorted([
        "cites DESIGN §, a document outside the repository",
        "link to a missing file: docs/nowhere.md",
        "link to a missing heading: " + os.path.relpath(ROOT / "docs/plugins.md", tmp_path) + "#no-such-heading",
        "missing file of package plait_tp: plait_tp/gone.py",
        "missing repository path: core/src/plait/gone.py",
        "no command `plait frobnicate`",
        "no hook plait_no_such_hook",
        "no option --training.nonsense",
        "no package named plait-gone in the repository",
        "no plugin 'nope' (in --plugins fsdp,nope)",
        "plait-someday is not built yet: say it is planned where it is named",
    ])
    doc.write_text(
        "[Plugins](" + os.path.relpath(ROOT / "docs/plugins.md", tmp_path) + "#hook-order), `docs/*.md`,\n"
        "`plugins/tp/README.md`; plait-someday is planned. `plait train --model.args.n_layers 2 --tp.async_tp True`\n"
    )
    assert problems_of(doc) == []


def test_planned_packages_are_not_built_yet() -> None:
    assert not PLANNED & distributions(), "a planned package exists now: drop it from PLANNED"


def test_hook_reference_is_in_sync_with_hookspecs() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "docs" / "generate_hook_reference.py"), "--check"])
    assert result.returncode == 0, "docs/hook-reference.md is stale: run python docs/generate_hook_reference.py"


def test_every_hook_is_documented() -> None:
    text = (ROOT / "docs" / "hook-reference.md").read_text()
    assert len(hooks()) >= 20
    for name in hooks():
        assert f"### `{name}(" in text
