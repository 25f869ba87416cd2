"""Test sessions of the plait monorepo.

Packages are found by their ``pyproject.toml`` under ``core/``, ``models/*/``,
``plugins/*/`` and ``experiments/*/``; a new package gets its sessions without any
change here.

Sessions (``nox --list`` shows them all):

- ``<package>`` (``core``, ``llama3``, ``fsdp``, ...): a fresh environment with torch, the
  core, the package, the in-repo packages it declares (``plait-*`` in its
  ``[project].dependencies`` and its ``test`` extra, taken from this repository) and its
  ``test`` extra, nothing else; runs
  ``pytest <package>/tests``. Proves the package works with only what it declares.
- ``integration``: every package installed; runs ``pytest tests/``.
- ``tests``: every package installed in editable mode in one environment; runs all the
  packages' tests and ``tests/`` in one pytest run. The README's and CI's test command
  (``pip install nox && nox -s tests``); plain ``nox`` runs it too.
- ``train``: the core and llama3; ``plait train --config llama3_debugmodel``. Arguments
  after ``--`` go to ``plait train``: ``nox -s train -- --training.steps 20``. For the
  other sessions they go to pytest: ``nox -s core -- -k parallel_dims``.

Backends: every session exists once per torch build. The plain name is CPU; ``-cuda`` and
``-rocm`` suffixes pick the GPU builds: ``nox -s core-cuda``, ``nox -s tests-rocm``.
Each pins torch through ``constraints/<backend>.txt``: torch is installed first from it,
and every later install gets ``-c constraints/<backend>.txt`` so nothing can replace it.
Tags select groups: ``nox -t ci-cuda`` runs every package session and ``integration`` on
CUDA (what the GPU workflow runs); ``nox -t cpu`` every CPU session.

``nox -r`` reuses the environments (``-R`` also skips the installs: the ``tests`` and
``train`` sessions install in editable mode, so they see source changes without one).
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nox
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # nox itself may run on 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent
PACKAGE_GLOBS = ("core", "models/*", "plugins/*", "experiments/*")
BACKENDS = ("cpu", "cuda", "rocm")
PYTEST_NO_TESTS_COLLECTED = 5
TORCH_CHECKS = {
    "cpu": "",
    "cuda": "assert torch.version.cuda, 'the CUDA backend installed a torch without CUDA'",
    "rocm": "assert torch.version.hip, 'the ROCm backend installed a torch without ROCm'",
}

nox.options.sessions = ["tests"]
# pip, not uv: pip honours the machine's pip configuration (local wheels, mirrors) and the
# index lines of the constraints files.
nox.options.default_venv_backend = "virtualenv"


@dataclass(frozen=True)
class Package:
    folder: str
    """Relative to the repository root, e.g. ``models/llama3``."""
    name: str = ""
    """Distribution name, e.g. ``plait-llama3``."""
    in_repo_requires: tuple[str, ...] = ()
    """Names of the in-repo distributions it depends on (``plait`` and ``plait-*``)."""
    in_repo_test_requires: tuple[str, ...] = ()
    """In-repo distributions its ``test`` extra names (a model package its tests train)."""
    has_test_extra: bool = False
    problem: str = ""
    """Why its pyproject.toml could not be read; its sessions report it."""

    @property
    def session(self) -> str:
        return Path(self.folder).name

    def spec(self, *, with_tests: bool) -> str:
        extra = "[test]" if with_tests and self.has_test_extra else ""
        return f"./{self.folder}{extra}"


def read_package(folder: Path) -> Package:
    relative = folder.relative_to(ROOT).as_posix()
    try:
        project = tomllib.loads((folder / "pyproject.toml").read_text())["project"]
        requires = tuple(
            canonicalize_name(Requirement(text).name) for text in project.get("dependencies", [])
        )
        test_requires = tuple(
            canonicalize_name(Requirement(text).name)
            for text in project.get("optional-dependencies", {}).get("test", [])
        )
    except (OSError, KeyError, tomllib.TOMLDecodeError, InvalidRequirement) as error:
        return Package(folder=relative, problem=f"{relative}/pyproject.toml: {error!r}")
    return Package(
        folder=relative,
        name=canonicalize_name(project["name"]),
        in_repo_requires=tuple(name for name in requires if name == "plait" or name.startswith("plait-")),
        in_repo_test_requires=tuple(name for name in test_requires if name.startswith("plait-")),
        has_test_extra="test" in project.get("optional-dependencies", {}),
    )


def discover() -> list[Package]:
    folders = [path.parent for pattern in PACKAGE_GLOBS for path in sorted(ROOT.glob(f"{pattern}/pyproject.toml"))]
    packages = [read_package(folder) for folder in folders]
    sessions = [package.session for package in packages]
    duplicates = {name for name in sessions if sessions.count(name) > 1}
    if duplicates:
        raise RuntimeError(f"package folders must have distinct names, found twice: {sorted(duplicates)}")
    return packages


PACKAGES = discover()
BY_NAME = {package.name: package for package in PACKAGES if package.name}
CORE = next(package for package in PACKAGES if package.folder == "core")
CROSS_PACKAGE_TESTS = ["tests"] if (ROOT / "tests").is_dir() else []


def require_readable(session: nox.Session, packages: list[Package]) -> None:
    for package in packages:
        if package.problem:
            session.error(f"cannot read {package.problem}")


def with_dependencies(session: nox.Session, package: Package, *, with_tests: bool = False) -> list[Package]:
    """The package and the in-repo packages it needs (with ``with_tests``, those its test
    extra names too, so pip takes them from this repository), dependencies first, core
    first of all."""
    ordered: list[Package] = []
    visiting: set[str] = set()

    def visit(current: Package) -> None:
        if current in ordered or current.folder in visiting:
            return
        visiting.add(current.folder)
        for name in current.in_repo_requires:
            dependency = BY_NAME.get(name)
            if dependency is None:
                session.error(f"{current.folder} depends on {name!r}, which no package folder of this repository provides")
            visit(dependency)
        ordered.append(current)

    visit(CORE)
    if with_tests:
        for name in package.in_repo_test_requires:
            dependency = BY_NAME.get(name)
            if dependency is None:
                session.error(f"{package.folder}'s test extra names {name!r}, which no package folder provides")
            visit(dependency)
    visit(package)
    return ordered


def install_torch(session: nox.Session, backend: str) -> list[str]:
    """Install torch from the backend's constraints; returns the ``-c`` arguments that
    every later install must pass."""
    constraints = ["-c", f"constraints/{backend}.txt"]
    # --no-compile halves the install time; imports write the bytecode they need.
    session.install("--no-compile", "torch", *constraints)
    check = TORCH_CHECKS[backend]
    session.run("python", "-c", f"import torch; print('torch', torch.__version__); {check}")
    return constraints


def run_pytest(session: nox.Session, *paths: str, rootdir: str | None = None) -> None:
    # Without --rootdir, pytest roots a run over several packages at the first package's
    # pyproject.toml.
    options = [f"--rootdir={rootdir}"] if rootdir else []
    session.run("pytest", *options, *paths, *session.posargs, success_codes=[0, PYTEST_NO_TESTS_COLLECTED])


def tests_folders(packages: list[Package]) -> list[str]:
    return [f"{package.folder}/tests" for package in packages if (ROOT / package.folder / "tests").is_dir()]


def check_unique_test_modules(session: nox.Session, paths: list[str]) -> None:
    """One pytest run imports test modules by file name: two ``test_x.py`` would clash."""
    seen: dict[str, str] = {}
    for path in paths:
        for module in sorted((ROOT / path).rglob("test_*.py")):
            relative = module.relative_to(ROOT).as_posix()
            if module.name in seen:
                session.error(
                    f"{relative} and {seen[module.name]} share a file name; rename one "
                    f"(test modules need distinct names to run in one pytest process)"
                )
            seen[module.name] = relative


# ---------------------------------------------------------------------------------------
# Session bodies, registered below once per backend
# ---------------------------------------------------------------------------------------


def package_session(package: Package, backend: str) -> Callable[[nox.Session], None]:
    def run(session: nox.Session) -> None:
        require_readable(session, [package])
        tests = tests_folders([package])
        if not tests:
            session.skip(f"{package.folder} has no tests folder yet")
        needed = with_dependencies(session, package, with_tests=True)
        require_readable(session, needed)
        constraints = install_torch(session, backend)
        specs = [needed_package.spec(with_tests=needed_package is package) for needed_package in needed]
        session.install(*specs, *constraints)
        run_pytest(session, *tests)

    run.__doc__ = f"{package.folder}: its tests with only what it declares installed ({backend})."
    return run


def integration_session(backend: str) -> Callable[[nox.Session], None]:
    def run(session: nox.Session) -> None:
        require_readable(session, PACKAGES)
        constraints = install_torch(session, backend)
        session.install(*(package.spec(with_tests=True) for package in PACKAGES), *constraints)
        run_pytest(session, *CROSS_PACKAGE_TESTS, rootdir=".")

    run.__doc__ = f"Cross-package tests in tests/ with every package installed ({backend})."
    return run


def all_tests_session(backend: str) -> Callable[[nox.Session], None]:
    def run(session: nox.Session) -> None:
        require_readable(session, PACKAGES)
        paths = [*tests_folders(PACKAGES), *CROSS_PACKAGE_TESTS]
        check_unique_test_modules(session, paths)
        constraints = install_torch(session, backend)
        editable = [argument for package in PACKAGES for argument in ("-e", package.spec(with_tests=True))]
        session.install(*editable, *constraints)
        # tests/ last: its test modules import helpers from its conftest.py, and the
        # conftest imported last is the one `import conftest` finds.
        run_pytest(session, *paths, rootdir=".")

    run.__doc__ = f"Every package's tests and tests/ in one environment and one pytest run ({backend})."
    return run


def train_session(backend: str) -> Callable[[nox.Session], None]:
    def run(session: nox.Session) -> None:
        llama3 = BY_NAME.get("plait-llama3")
        if llama3 is None:
            session.error("the train session needs models/llama3")
        needed = with_dependencies(session, llama3)
        require_readable(session, needed)
        constraints = install_torch(session, backend)
        editable = [argument for package in needed for argument in ("-e", package.spec(with_tests=False))]
        session.install(*editable, *constraints)
        session.run("plait", "train", "--config", "llama3_debugmodel", *session.posargs)

    run.__doc__ = f"plait train --config llama3_debugmodel; arguments after -- go to plait train ({backend})."
    return run


def loss_baseline_session(backend: str) -> Callable[[nox.Session], None]:
    def run(session: nox.Session) -> None:
        names = ["plait-llama3", *(["plait-rocm"] if backend == "rocm" else [])]
        needed: list[Package] = []
        for name in names:
            if name not in BY_NAME:
                session.error(f"the loss-baseline session needs the {name} package")
            needed += [package for package in with_dependencies(session, BY_NAME[name]) if package not in needed]
        require_readable(session, needed)
        constraints = install_torch(session, backend)
        editable = [argument for package in needed for argument in ("-e", package.spec(with_tests=False))]
        session.install(*editable, *constraints)
        session.run("python", "benchmarks/loss_baseline.py", "--backend", backend, *session.posargs)

    run.__doc__ = (f"The debug run's per-step losses against benchmarks/loss_baselines/{backend}.json "
                   f"({backend}; -- --write stores them).")
    return run


def register(name: str, body: Callable[[nox.Session], None], tags: list[str]) -> None:
    nox.session(name=name, tags=tags)(body)


for backend in BACKENDS:
    suffix = "" if backend == "cpu" else f"-{backend}"
    ci = f"ci-{backend}"
    for package in PACKAGES:
        register(f"{package.session}{suffix}", package_session(package, backend), [backend, ci, "package"])
    register(f"integration{suffix}", integration_session(backend), [backend, ci, "integration"])
    register(f"tests{suffix}", all_tests_session(backend), [backend, "tests"])
    register(f"train{suffix}", train_session(backend), [backend, "train"])
    register(f"loss-baseline{suffix}", loss_baseline_session(backend), [backend, "loss-baseline"])
