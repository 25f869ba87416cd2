"""`plait` command line: train, plugins, plan, convert, generate, preprocess.

Every command is parsed by tyro from dataclasses, with one style of option names
(``--section.field`` with underscores; hyphens are accepted too). The plugin/model
selection (``--config``, ``--model``, ``--plugins``) is declared once (``Selection``) and
shared by train, plan and plugins.

`plait train` (and `plait plan`) parse in two phases: first the selection, which enables
plugins, then the typed config of the core plus the enabled plugins' sections, so
`--help` shows exactly the options of what is enabled.

Modules: ``options`` (the option dataclasses and the one parse function), ``installed``
(what installed plugins declare, read without importing them), ``config_parsing`` (the
two phases, saved configs, ``--model.args.*``), ``commands`` (the commands).
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from importlib import metadata
from typing import Any, NoReturn

from plait.cli.commands import (
    convert_command,
    describe_os_error,
    plan_command,
    plugins_command,
    preprocess_command,
    setup_logging,
    train,
    train_command,
    write_resolved_config,
)
from plait.cli.config_parsing import parse_selection, resolve_train_config
from plait.cli.generate import generate_command
from plait.cli.installed import installed_lines
from plait.cli.options import ConvertOptions, PlanOptions, Selection, field_help, parse
from plait.errors import ConfigError, Interrupted, PlaitError

__all__ = [
    "COMMANDS", "ConvertOptions", "PlanOptions", "Selection", "exit_process", "field_help", "main", "parse",
    "parse_selection", "program", "resolve_train_config", "setup_logging", "train", "usage", "version_line",
    "write_resolved_config",
]  # fmt: skip


COMMANDS = {
    "train": "train a model: plait train --config llama3_debugmodel [--section.field value ...]",
    "plugins": "list installed plugins (what each provides, enabled or not), models and recipes",
    "plan": "dry run at any scale: memory, parameters and FLOPs per rank, from one process",
    "convert": "export a plait checkpoint to a Hugging Face folder",
    "preprocess": "run a model's preprocessing once over its dataset (e.g. flux's frozen encoders) into a folder",
    "generate": "continue prompts with a checkpoint or a Hugging Face folder (KV cache, greedy or sampled)",
}


def main(argv: list[str] | None = None) -> int:
    """Run one `plait` command; returns its exit status (2: bad command line or config)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    with _signals_raise():
        return _run(argv)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM raises ``Interrupted`` as SIGINT raises KeyboardInterrupt: a signal during
    start-up (before the training loop takes the signals over) ends with a message."""
    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: the signals stay with the caller
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str]) -> int:
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(usage())
            return 0
        if argv[0] in ("-V", "--version"):
            print(version_line())
            return 0
        command, rest = argv[0], argv[1:]
        handlers = {"train": train_command, "plugins": plugins_command, "plan": plan_command,
                    "convert": convert_command, "generate": generate_command, "preprocess": preprocess_command}
        if command not in handlers:
            if command.startswith("-"):
                raise ConfigError(f"the command comes first: plait <command> {command} ... "
                                  f"(commands: {', '.join(handlers)}; see plait --help)")
            close = difflib.get_close_matches(command, list(handlers), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown command {command!r}.{hint} Choose one of: {', '.join(handlers)}")
        return handlers[command](rest)
    except KeyboardInterrupt:
        error = Interrupted(signal.SIGINT)
        print(f"plait: error: {error}", file=sys.stderr)
        return error.exit_code
    except PlaitError as exc:
        print(f"plait: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # what the file system said, in words (disk full, read-only, ...)
        print(f"plait: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except SystemExit as exc:  # tyro's --help (0) and its option errors (2), already printed
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)


def program() -> NoReturn:
    """The `plait` executable: ``main()`` and its exit code."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # `plait train --help | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    exit_process(code)


def exit_process(code: int, *, distributed: bool | None = None) -> NoReturn:
    """Leave with ``code``. A rank of a distributed run (by default: WORLD_SIZE > 1)
    leaves with ``os._exit`` once its output is flushed: gloo and NCCL state freed during
    interpreter finalization can abort a process (SIGABRT, "terminate called without an
    active exception") whose run has already finished and saved, and the launcher would
    then report the run as failed."""
    if distributed is None:
        world_size = os.environ.get("WORLD_SIZE", "1").strip()
        distributed = world_size.isdigit() and int(world_size) > 1
    if distributed:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def version_line() -> str:
    """plait's version, torch's (read from its metadata, not imported) and the plugin count."""
    from plait import __version__
    from plait.plugins import installed_plugins

    try:
        torch = f", torch {metadata.version('torch')}"
    except metadata.PackageNotFoundError:
        torch = ", torch not installed"
    count = len(installed_plugins())
    return f"plait {__version__}{torch}, {count} plugin{'s' if count != 1 else ''} installed"


def usage() -> str:
    """`plait --help`."""
    metavars = {"config": "RECIPE", "model": "NAME", "plugins": "A,B"}
    lines = ["usage: plait [-h] [--version] <command> [options]", "", "commands:"]
    lines += [f"  {name:<17} {text}" for name, text in COMMANDS.items()]
    lines += ["", "selection (train, plan and plugins parse it first):"]
    lines += [f"  {'--' + name + ' ' + metavars[name]:<17} {text}" for name, text in field_help(Selection).items()]
    lines += ["", "options:",
              f"  {'-h, --help':<17} this help; `plait <command> --help` shows every option of a command",
              f"  {'-V, --version':<17} plait's version, torch's and the number of installed plugins",
              "", "installed (see `plait plugins`):", *installed_lines(), "",
              "Config options are --section.field VALUE (e.g. --training.steps 20); each enabled plugin",
              "adds its own section. Option names are spelled with underscores; hyphens work too",
              "(--world-size = --world_size). Example:",
              "  plait train --config llama3_debugmodel --plugins fsdp --training.steps 20 --help"]
    return "\n".join(lines)


if __name__ == "__main__":
    program()
