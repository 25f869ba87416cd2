"""`plait` command line: train, plugins, plan, convert.

Every command is parsed by tyro from dataclasses, with one style of option names
(``--section.field`` with underscores; hyphens are accepted too). The plugin/model
selection (``--config``, ``--model``, ``--plugins``) is declared once (``Selection``) and
shared by train, plan and plugins.

`plait train` (and `plait plan`) parse in two phases: first the selection, which enables
plugins, then the typed config of the core plus the enabled plugins' sections, so
`--help` shows exactly the options of what is enabled.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import gc
import importlib.util
import json
import logging
import os
import sys
import textwrap
from importlib import metadata
import typing
from typing import Annotated, Any, Literal, NoReturn, Optional

import tyro

from plait.errors import ConfigError, PlaitError

COMMANDS = {
    "train": "train a model: plait train --config llama3_debugmodel [--section.field value ...]",
    "plugins": "list installed plugins (what each provides, enabled or not), models and recipes",
    "plan": "dry run at any scale: memory, parameters and FLOPs per rank, from one process",
    "convert": "export a plait checkpoint to a Hugging Face folder",
}

logger = logging.getLogger("plait")

#: how every command is parsed: option names as the fields are spelled, booleans take a value
_TYRO_CONFIG = (tyro.conf.FlagConversionOff,)


def main(argv: list[str] | None = None) -> int:
    """Run one `plait` command; returns its exit status (2: bad command line or config)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(usage())
            return 0
        if argv[0] in ("-V", "--version"):
            print(version_line())
            return 0
        command, rest = argv[0], argv[1:]
        handlers = {"train": train_command, "plugins": plugins_command, "plan": plan_command,
                    "convert": convert_command}
        if command not in handlers:
            if command.startswith("-"):
                raise ConfigError(f"the command comes first: plait <command> {command} ... "
                                  f"(commands: {', '.join(handlers)}; see plait --help)")
            close = difflib.get_close_matches(command, list(handlers), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown command {command!r}.{hint} Choose one of: {', '.join(handlers)}")
        return handlers[command](rest)
    except PlaitError as exc:
        print(f"plait: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # what the file system said, in words (disk full, read-only, ...)
        print(f"plait: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except SystemExit as exc:  # tyro's --help (0) and its option errors (2), already printed
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)


def describe_os_error(error: OSError) -> str:
    import errno

    where = f" ({error.filename})" if error.filename else ""
    if error.errno == errno.ENOSPC:
        return f"the disk is full{where}: free space or choose another folder, then run the same command again"
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"no permission to write{where} ({error.strerror}): choose a folder you can write"
    return f"{error.strerror or error}{where}"


def check_writable_folder(path: str, option: str) -> None:
    """``path`` is (or can be made) a folder this process writes: checked before any work."""
    import tempfile

    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{option} {path} is a file, not a folder: choose a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".plait-write-check-"):
            pass
    except OSError as error:
        raise ConfigError(f"{option} {path} is not a folder plait can write: {describe_os_error(error)}") from None


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
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


# --------------------------------------------------------------------------- options


@dataclasses.dataclass(kw_only=True)
class Selection:
    """What to train and which plugins to enable (parsed first: the enabled plugins add
    their own ``--<plugin>.*`` options)."""

    config: Annotated[str, tyro.conf.arg(metavar="RECIPE")] = ""
    """Named recipe to start from, e.g. llama3_debugmodel (enables its model package)."""
    model: Annotated[str, tyro.conf.arg(metavar="NAME")] = ""
    """Model to train, e.g. llama3 (enables the package providing it); optional with --config."""
    plugins: Annotated[str, tyro.conf.arg(metavar="A,B")] = ""
    """Comma-separated plugins to enable, e.g. fsdp,tp; each adds its --<plugin>.* options."""

    @property
    def plugin_names(self) -> list[str]:
        return [p.strip() for p in self.plugins.split(",") if p.strip()]


@dataclasses.dataclass(kw_only=True)
class PlanOptions:
    """Options of `plait plan` (besides those of `plait train`)."""

    world_size: Annotated[int, tyro.conf.arg(metavar="N")] = 0
    """Number of ranks to plan for (required), e.g. 512 (--world-size works too)."""
    json: Annotated[str, tyro.conf.arg(metavar="FILE")] = ""
    """Also write the plan as JSON to this file."""
    device_memory_gib: Annotated[float, tyro.conf.arg(metavar="GIB")] = 0.0
    """Memory of one device in GiB: ranks whose estimated peak exceeds it are flagged (0: no check)."""


@dataclasses.dataclass(kw_only=True)
class ConvertOptions:
    checkpoint: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="CHECKPOINT")]
    """A checkpoint folder, e.g. outputs/checkpoint/step-50."""
    output: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="OUTPUT")]
    """The Hugging Face folder to write."""
    model: Annotated[str, tyro.conf.arg(metavar="NAME")] = ""
    """Model name (default: from the run's config.json)."""
    flavor: Annotated[str, tyro.conf.arg(metavar="FLAVOR")] = ""
    """Model flavor (default: from the run's config.json)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the written floating-point weights (the checkpoint stores float32)."""


def _parse(cls: type, argv: list[str], *, prog: str, description: str | None = None,
           default: Any = tyro.MISSING_NONPROP, partial: bool = False,
           selection: Selection | None = None) -> Any:
    """The one way plait parses a command line. ``partial``: phase 1 of a two-phase parse,
    which returns (parsed, the args left) and leaves --help to phase 2. Otherwise an option
    that ``cls`` lacks is one ``ConfigError`` with close matches (or the plugin that adds it)."""
    parsed, unknown = tyro.cli(cls, args=argv, prog=prog, description=description, default=default,
                               return_unknown_args=True, add_help=not partial, use_underscores=True,
                               config=_TYRO_CONFIG)
    if partial:
        return parsed, unknown
    if unknown:
        _reject_unknown(unknown, cls, prog, selection or Selection())
    return parsed


def _option_names(cls: type, prefix: str = "") -> list[str]:
    """``--section.field`` names of a dataclass as plait parses it (for suggestions only)."""
    import typing

    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except Exception:  # noqa: BLE001 - suggestions are best effort
        return []
    positional = typing.get_args(tyro.conf.Positional[int])[1]
    names = []
    for f in dataclasses.fields(cls):
        kind, markers = hints.get(f.name), ()
        if typing.get_origin(kind) is Annotated:
            kind, *markers = typing.get_args(kind)
        if positional in markers:
            continue
        flat = any(getattr(marker, "name", None) == "" for marker in markers)
        name = prefix if flat else f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(kind):
            names += _option_names(kind, name)  # type: ignore[arg-type]
        else:
            names.append("--" + name)
    return names


def _reject_unknown(unknown: list[str], cls: type, prog: str, selection: Selection) -> NoReturn:
    options = [a.split("=", 1)[0] for a in unknown if a.startswith("-") and a != "--"]
    if not options:
        raise ConfigError(f"unexpected argument{'s' if len(unknown) > 1 else ''} "
                          f"{' '.join(unknown)} (see {prog} --help)")
    known = _option_names(cls)
    sections = {n[2:].split(".", 1)[0] for n in known if "." in n}
    _check_plugin_options(options, sections, selection)
    option = options[0]
    normalized = "--" + option.lstrip("-").replace("-", "_")
    leaf = normalized.rsplit(".", 1)[-1].lstrip("-")
    close = [n for n in known if n.rsplit(".", 1)[-1].lstrip("-") == leaf and n != normalized]
    close += [n for n in difflib.get_close_matches(normalized, known, n=3, cutoff=0.7) if n not in close]
    hint = f" Did you mean {' or '.join(close[:3])}?" if close else ""
    rest = f" (also unrecognized: {' '.join(options[1:])})" if len(options) > 1 else ""
    raise ConfigError(f"unrecognized option {option}.{hint}{rest} `{prog} --help` lists the options.")


def _wants_help(argv: list[str]) -> bool:
    return "-h" in argv or "--help" in argv


# --------------------------------------------------------------------------- installed plugins


@dataclasses.dataclass(frozen=True)
class PluginInfo:
    """What a plugin module declares, read without running it where possible."""

    provides: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    description: str = ""
    error: str = ""


_DECLARED = {"PROVIDES": "provides", "REQUIRES": "requires", "DESCRIPTION": "description"}


def _declared_in_source(module_name: str) -> PluginInfo | None:
    """PROVIDES/REQUIRES/DESCRIPTION as literals in the module's source, or None (then the
    module is imported). Locating the module imports its parent package only."""
    try:
        spec = importlib.util.find_spec(module_name)
        origin = spec.origin if spec else None
        if not origin or not origin.endswith(".py"):
            return None
        with open(origin, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=origin)
    except Exception:  # a broken plugin: the import fallback words the error
        return None
    values: dict[str, Any] = {}
    for node in tree.body:
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AnnAssign) else [])
        for target in targets:
            if isinstance(target, ast.Name) and target.id in _DECLARED and node.value is not None:
                try:
                    values[_DECLARED[target.id]] = ast.literal_eval(node.value)
                except ValueError:
                    return None
    return _info(values)


def _info(values: dict[str, Any]) -> PluginInfo:
    return PluginInfo(provides=tuple(str(v) for v in values.get("provides") or ()),
                      requires=tuple(str(v) for v in values.get("requires") or ()),
                      description=str(values.get("description") or ""))


def plugin_info(plugin: Any) -> PluginInfo:
    """PROVIDES, REQUIRES and DESCRIPTION of an installed plugin (``InstalledPlugin``)."""
    module_name = plugin.entry_point.module
    module = sys.modules.get(module_name)
    if module is None:
        info = _declared_in_source(module_name)
        if info is not None:
            return info
        try:
            module = plugin.import_module()
        except PlaitError as exc:
            return PluginInfo(error=str(exc))
    return _info({field: getattr(module, name, None) for name, field in _DECLARED.items()})


def installed_summary() -> tuple[dict[str, PluginInfo], list[str], list[str]]:
    """(info by installed plugin, model names, recipe names), importing no plugin."""
    from plait.plugins import installed_plugins, installed_recipes

    plugins = installed_plugins()
    infos = {name: plugin_info(plugin) for name, plugin in plugins.items()}
    models = sorted(c[len("model:"):] for info in infos.values() for c in info.provides if c.startswith("model:"))
    distributions = {plugin.distribution for plugin in plugins.values()}
    recipes = [name for name, ep in installed_recipes().items()  # those of a visible plugin package
               if ep.dist is None or ep.dist.metadata["Name"] in distributions]
    return infos, models, recipes


def _section_owners() -> dict[str, str]:
    """Config section -> the installed plugin that adds it. Imports the light plugin
    modules, so it runs only to word an error."""
    from plait.plugins import installed_plugins

    owners: dict[str, str] = {}
    for name, plugin in installed_plugins().items():
        try:
            hook = getattr(plugin.import_module(), "plait_add_config_sections", None)
            if hook is not None:
                hook(register=lambda section, cls, _name=name: owners.setdefault(section, _name))
        except Exception:  # noqa: BLE001 - a broken plugin owns nothing here
            continue
    return owners


def _check_plugin_options(options: list[str], sections: set[str], selection: Selection) -> None:
    """``--tp.sequence_parallel False`` without ``--plugins tp``: name the plugin to enable
    instead of a bare "unrecognized option"."""
    owners: dict[str, str] | None = None
    for option in options:
        if not option.startswith("--") or "." not in option:
            continue
        section = option[2:].split(".", 1)[0].replace("-", "_")
        if section in sections:
            continue
        owners = _section_owners() if owners is None else owners
        owner = owners.get(section)
        if owner is None or owner in selection.plugin_names:
            continue  # a plain unknown option: close matches are suggested
        from plait.plugins import installed_plugins

        info = plugin_info(installed_plugins()[owner])
        if any(c.startswith("model:") for c in info.provides):
            model = next(c[len("model:"):] for c in info.provides if c.startswith("model:"))
            raise ConfigError(f"{option}: --{section}.* belongs to model package {owner!r}, which is not "
                              f"enabled: it comes with --model {model}")
        plugins = ",".join([*selection.plugin_names, owner])
        raise ConfigError(f"{option}: --{section}.* belongs to plugin {owner!r}, which is not enabled: "
                          f"add --plugins {plugins}")


# --------------------------------------------------------------------------- help and version


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


def _field_help(cls: type) -> dict[str, str]:
    """The docstrings of ``cls``'s fields (what tyro shows as their help)."""
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def _installed_lines() -> list[str]:
    infos, models, recipes = installed_summary()
    plugins = [name for name, info in infos.items() if not any(c.startswith("model:") for c in info.provides)]
    lines = []
    for title, names in (("recipes (--config)", recipes), ("models (--model)", models),
                         ("plugins (--plugins)", plugins)):
        lines += textwrap.wrap(", ".join(names) or "none", width=100, initial_indent=f"  {title + ':':<21} ",
                               subsequent_indent=" " * 24)
    return lines


def usage() -> str:
    """`plait --help`."""
    metavars = {"config": "RECIPE", "model": "NAME", "plugins": "A,B"}
    lines = ["usage: plait [-h] [--version] <command> [options]", "", "commands:"]
    lines += [f"  {name:<17} {text}" for name, text in COMMANDS.items()]
    lines += ["", "selection (train, plan and plugins parse it first):"]
    lines += [f"  {'--' + name + ' ' + metavars[name]:<17} {text}" for name, text in _field_help(Selection).items()]
    lines += ["", "options:",
              f"  {'-h, --help':<17} this help; `plait <command> --help` shows every option of a command",
              f"  {'-V, --version':<17} plait's version, torch's and the number of installed plugins",
              "", "installed (see `plait plugins`):", *_installed_lines(), "",
              "Config options are --section.field VALUE (e.g. --training.steps 20); each enabled plugin",
              "adds its own section. Option names are spelled with underscores; hyphens work too",
              "(--world-size = --world_size). Example:",
              "  plait train --config llama3_debugmodel --plugins fsdp --training.steps 20 --help"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- selection


def parse_selection(argv: list[str], *, prog: str = "plait train") -> tuple[Selection, list[str]]:
    """Phase 1: the selection; the rest of ``argv`` (--help included) is left for phase 2."""
    return _parse(Selection, argv, prog=prog, partial=True)


def select_plugins(selection: Selection, *, for_help: bool = False):
    """Enable the model plugin and --plugins; return (manager, base config)."""
    from plait.config import JobConfig
    from plait.plugins import PluginManager, installed_recipes, recipe_owner

    manager = PluginManager()
    base = JobConfig()
    if is_config_file(selection.config):
        base = load_config_file(selection.config, manager)
    elif selection.config:
        owner, recipe = recipe_owner(selection.config)
        manager.enable([owner])
        base = recipe()
        if not isinstance(base, JobConfig):
            raise ConfigError(f"recipe {selection.config!r} must return a plait.config.JobConfig, "
                              f"got {type(base).__name__}")
    if selection.model:
        if selection.config and base.model.name and base.model.name != selection.model:
            raise ConfigError(f"--model {selection.model} conflicts with recipe {selection.config!r}, "
                              f"which trains {base.model.name!r}: pass one of them")
        base.model.name = selection.model
    if not base.model.name and for_help:  # help for the core sections and --plugins
        manager.enable(selection.plugin_names)
        return manager, base
    if not base.model.name:
        models = manager.installed_models()
        raise ConfigError(
            "choose what to train: --config RECIPE (installed: "
            f"{', '.join(installed_recipes()) or 'none'}) or --model NAME (installed: {', '.join(models) or 'none'})"
        )
    manager.enable_model(base.model.name)
    manager.enable(selection.plugin_names)
    return manager, base


def is_config_file(name: str) -> bool:
    """``--config`` names a saved config (a run's ``config.json``) rather than a recipe."""
    return name.endswith(".json") or os.sep in name or os.path.isfile(name)


def load_config_file(path: str, manager: Any) -> Any:
    """The config a run saved (``<dump_folder>/config.json``), its plugins enabled; the
    command line's options apply on top of it."""
    from plait.config import JobConfig

    try:
        with open(path) as f:
            document = json.load(f)
    except OSError as error:
        raise ConfigError(f"--config {path}: cannot read it ({error.strerror})") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"--config {path} is not valid JSON ({error}); pass a config.json that plait "
                          "train wrote, or a recipe name") from None
    if not isinstance(document, dict) or not isinstance(document.get("model"), dict):
        raise ConfigError(f"--config {path} is not a plait config: expected the JSON object plait train writes "
                          "to <dump_folder>/config.json (with a 'model' section)")
    document = dict(document)
    plugins = document.pop("plugins", [])
    document.pop("model_args", None)  # the resolved args, for reading; model.args holds the overrides
    model_name = document["model"].get("name", "")
    if model_name:
        manager.enable_model(model_name)
    manager.enable([name for name in plugins if name not in manager.enabled])
    section_types = typing.get_type_hints(JobConfig)
    plugin_types = manager.config_sections
    unknown = sorted(set(document) - set(section_types) - set(plugin_types))
    if unknown:
        raise ConfigError(f"--config {path}: unknown section(s) {', '.join(unknown)} (a plugin that is not "
                          "installed, or a config of another plait version)")
    base = JobConfig(**{name: _section_from_dict(section_types[name], values, f"{path}: {name}")
                        for name, values in document.items() if name in section_types})
    base.plugin_sections = {name: _section_from_dict(plugin_types[name], values, f"{path}: {name}")
                            for name, values in document.items() if name in plugin_types}
    return base


def _section_from_dict(cls: type, values: Any, where: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}; its options: {', '.join(fields)}")
    converted = {}
    for name, value in values.items():
        default = fields[name].default
        converted[name] = tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value
    return cls(**converted)


def build_config_class(sections: dict[str, type], model_section: type | None = None) -> type:
    """The root config class of the command line: the core's sections, the enabled
    plugins' and, once the model is known, a model section with its ``--model.args.*``."""
    from plait.config import JobConfig

    fields = [(name, cls, dataclasses.field(default_factory=cls)) for name, cls in sections.items()]
    if model_section is not None:
        fields.append(("model", model_section, dataclasses.field(default_factory=model_section)))
    if not fields:
        return JobConfig
    return dataclasses.make_dataclass("JobConfig", fields, bases=(JobConfig,), kw_only=True)


def model_section_class(spec: Any) -> type | None:
    """``--model.*`` with a typed ``--model.args.FIELD`` for every scalar field of the
    model's args dataclass (None: keep the flavor's or the checkpoint's value)."""
    from plait.config import ModelSection
    from plait.model_args import scalar_fields

    args_class = type(next(iter(spec.flavors.values()), None))
    if not dataclasses.is_dataclass(args_class):
        return None
    args_help = _field_help(args_class) if _has_source(args_class) else {}
    overrides = dataclasses.make_dataclass(
        f"{args_class.__name__}Overrides",
        [(name, Annotated[Optional[kind], tyro.conf.arg(help=args_help.get(name, f"{spec.name} model arg"))],
          dataclasses.field(default=None)) for name, kind in scalar_fields(args_class).items()],
        kw_only=True,
    )
    model_help = _field_help(ModelSection)
    fields = [(f.name, Annotated[f.type if isinstance(f.type, type) else str, tyro.conf.arg(help=model_help.get(f.name))],
               dataclasses.field(default=f.default)) for f in dataclasses.fields(ModelSection) if f.name != "args"]
    fields.append(("args", Annotated[overrides, tyro.conf.arg(help=model_help.get("args"))],
                   dataclasses.field(default_factory=overrides)))
    return dataclasses.make_dataclass("ModelSection", fields, kw_only=True)


def _has_source(cls: type) -> bool:
    import inspect

    try:
        inspect.getsource(cls)
    except (OSError, TypeError):
        return False
    return True


def _model_for_command_line(model_section: type, model: Any) -> Any:
    """The recipe's (or saved config's) model section as ``model_section`` shows it."""
    args_type = next(f.type for f in dataclasses.fields(model_section) if f.name == "args")
    args_class = typing.get_args(args_type)[0] if typing.get_origin(args_type) is Annotated else args_type
    known = {f.name for f in dataclasses.fields(args_class)}
    scalars = {name: value for name, value in model.args.items() if name in known}
    values = {f.name: getattr(model, f.name) for f in dataclasses.fields(model_section) if f.name != "args"}
    return model_section(**values, args=args_class(**scalars))


def _model_from_command_line(parsed: Any, base: Any) -> Any:
    """Back to a plain ``ModelSection``: overrides given anywhere, the command line's last."""
    from plait.config import ModelSection

    given = {f.name: getattr(parsed.args, f.name) for f in dataclasses.fields(parsed.args)}
    args = {**base.args, **{name: value for name, value in given.items() if value is not None}}
    values = {f.name: getattr(parsed, f.name) for f in dataclasses.fields(ModelSection) if f.name != "args"}
    return ModelSection(**values, args=args)


_DESCRIPTIONS = {
    "plait train": "Train a model.",
    "plait plan": (
        "Dry run at any scale: builds the meshes and the parallelized model of the run for "
        "--world_size ranks in this one process (a fake process group stands in for the others), "
        "then reports per rank the parameters, gradients, optimizer state, the activation peak of "
        "one micro-batch, the estimated peak memory and the FLOPs per step. Invalid layouts fail "
        "as they would on hardware. Takes every option of plait train."
    ),
}


def _description(prog: str, manager) -> str:
    infos, models, recipes = installed_summary()
    plugins = [n for n, i in infos.items() if not any(c.startswith("model:") for c in i.provides)]
    lines = [*textwrap.wrap(_DESCRIPTIONS.get(prog, ""), 80), "", *textwrap.wrap(
        "Select first with --config RECIPE and/or --model NAME, and --plugins A,B: each enabled "
        "plugin adds its own --<plugin>.* options below.", 80)]
    for title, names in (("enabled", manager.enabled), ("installed recipes", recipes),
                         ("installed models", models), ("installed plugins", plugins)):
        lines += textwrap.wrap(", ".join(names) or "none", 80, initial_indent=f"  {title + ':':<19} ",
                               subsequent_indent=" " * 22)
    return "\n".join(lines)


def parse_config(manager, base, argv: list[str], *, prog: str = "plait train",
                 selection: Selection | None = None, options: Any = None):
    """Phase 2, the full typed config: the base (recipe) with command-line overrides applied.
    ``selection`` and ``options`` (a command's own options, already parsed) only appear in
    --help; ``argv`` no longer holds them."""
    spec = manager.model_specs.get(base.model.name)  # a missing model is reported once the config is parsed
    model_section = model_section_class(spec) if spec is not None else None
    cls = build_config_class(manager.config_sections, model_section)
    sections = {**base.sections(), **{name: section() for name, section in manager.config_sections.items()},
                **getattr(base, "plugin_sections", {})}
    if model_section is not None:
        sections["model"] = _model_for_command_line(model_section, base.model)
    default = cls(**sections)
    selection = selection or Selection()
    flat = tyro.conf.arg(name="")  # no prefix: --config, --world_size, --training.steps
    fields: list[tuple[str, Any]] = [("selection", Annotated[Selection, flat])]
    values: dict[str, Any] = {"selection": selection}
    if options is not None:
        fields.append(("options", Annotated[type(options), flat]))
        values["options"] = options
    fields.append(("job_config", Annotated[cls, flat]))
    values["job_config"] = default
    command = dataclasses.make_dataclass("Command", fields, kw_only=True)
    parsed = _parse(command, argv, prog=prog, description=_description(prog, manager), default=command(**values),
                    selection=selection)
    config = parsed.job_config
    if model_section is not None:
        config.model = _model_from_command_line(config.model, base.model)
    return config


def resolve_train_config(argv: list[str], *, world_size: int | None = None, prog: str = "plait train",
                         options: Any = None):
    """Phase 1 + phase 2 + every check that runs before any work, once: the resolved ``Job``.
    The world size is torchrun's unless given. ``options``: the calling command's own
    options (e.g. ``PlanOptions``), already parsed, shown by --help."""
    selection, rest = parse_selection(argv, prog=prog)
    manager, base = select_plugins(selection, for_help=_wants_help(rest))
    config = parse_config(manager, base, rest, prog=prog, selection=selection, options=options)  # --help exits here
    from plait.job import resolve_job  # imports torch: after --help and the option errors
    from plait.train import world_size_from_env

    spec = manager.model_spec(config.model.name)
    return resolve_job(config, manager, spec, world_size_from_env() if world_size is None else world_size)


def write_resolved_config(config, manager, model_args: Any = None) -> str:
    """The run's config as ``<dump_folder>/config.json`` (``--config`` loads it back), and
    a copy per attempt in ``<dump_folder>/configs/attempt-N.json``, which later attempts
    never overwrite. ``model_args``: the resolved model args, recorded for reading (and
    for ``plait convert``)."""
    from plait.model_args import args_to_dict

    attempts = os.path.join(config.job.dump_folder, "configs")
    os.makedirs(attempts, exist_ok=True)
    document = {"plugins": [n for n in manager.enabled], **config.to_dict()}
    if model_args is not None and dataclasses.is_dataclass(model_args):
        document["model_args"] = args_to_dict(model_args)
    text = json.dumps(document, indent=2, sort_keys=False, default=str)
    number = 1 + max((int(name[8:-5]) for name in os.listdir(attempts)
                      if name.startswith("attempt-") and name[8:-5].isdigit()), default=0)
    for path in (os.path.join(attempts, f"attempt-{number}.json"), os.path.join(config.job.dump_folder, "config.json")):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    return path


def setup_logging(rank: int) -> None:
    log = logging.getLogger("plait")
    if log.handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    prefix = f"[rank{rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False


# --------------------------------------------------------------------------- commands


def train_command(argv: list[str]) -> int:
    result = train(argv)
    if result.stopped_by_signal:
        logger.info("stopped at step %d on a signal; checkpoint saved, resume with the same command",
                    result.last_step)
    return 0


def train(argv: list[str]):
    """`plait train ARGV` in this process; returns the ``TrainResult`` (losses by step)."""
    job = resolve_train_config(argv)
    config, manager = job.config, job.plugins
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)
    if rank == 0:
        dump = config.job.dump_folder
        check_writable_folder(dump, "--job.dump_folder")
        for enabled, sub, option in ((config.checkpoint.enable, config.checkpoint.folder, "--checkpoint.folder"),
                                     (config.metrics.enable_tensorboard, config.metrics.tensorboard_folder,
                                      "--metrics.tensorboard_folder")):
            if enabled:
                check_writable_folder(os.path.join(dump, sub), option)
        path = write_resolved_config(config, manager, job.declared_model_args)
        logger.info("plugins: %s; resolved config: %s", ", ".join(manager.enabled), path)
    from plait.train import Trainer

    trainer = Trainer(job)
    try:
        return trainer.train()
    finally:
        trainer.close()
        del trainer
        gc.collect()  # free what held process groups and tensors while the interpreter is whole


def plugins_command(argv: list[str]) -> int:
    """List installed plugins (name, distribution, version, enabled, provides, description)."""
    selection = _parse(Selection, argv, prog="plait plugins", description=(
        "List the installed plugins (what each provides, enabled or not), models and recipes, "
        "importing no plugin. With a selection, marks the plugins it enables."))
    from plait.plugins import installed_plugins

    enabled: set[str] = set()
    if selection.config or selection.model or selection.plugins:
        manager, _ = select_plugins(selection)
        enabled = set(manager.enabled)
    infos, models, recipes = installed_summary()
    rows = [("NAME", "DISTRIBUTION", "VERSION", "ENABLED", "PROVIDES", "DESCRIPTION")]
    for name, plugin in installed_plugins().items():
        info = infos[name]
        if info.error:
            provides, description = "-", f"(import failed: {info.error})"
        else:
            provides = ",".join(info.provides) or "-"
            description = info.description or "-"
            if info.requires:
                description += f" [requires: {', '.join(info.requires)}]"
        rows.append((name, plugin.distribution, plugin.version, "yes" if name in enabled else "no",
                     provides, description))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])) + "  " + row[-1])
    print(f"\nmodels ({len(models)}): " + (", ".join(models) or "none"))
    print(f"recipes ({len(recipes)}): " + (", ".join(recipes) or "none"))
    return 0


def plan_command(argv: list[str]) -> int:
    """`plait plan --world-size N [train options]`: the run's layout and memory per rank."""
    options, rest = _parse(PlanOptions, argv, prog="plait plan", partial=True)
    if not _wants_help(rest):
        if options.world_size < 1:
            raise ConfigError("plait plan needs the number of ranks to plan for: --world-size N "
                              "(e.g. --world-size 512)")
        if options.device_memory_gib < 0:
            raise ConfigError(f"--device-memory-gib must be >= 0, got {options.device_memory_gib}")
    job = resolve_train_config(rest, world_size=options.world_size, prog="plait plan", options=options)
    from plait.plan import format_plan, plan

    result = plan(job)
    print(format_plan(result, device_memory_gib=options.device_memory_gib))
    if options.json:
        with open(options.json, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
    return 0


def convert_command(argv: list[str]) -> int:
    args = _parse(ConvertOptions, argv, prog="plait convert", description=(
        "Export a plait checkpoint (a step-N folder) to a Hugging Face folder that transformers "
        "loads and generates from: weights, config, generation config and the run's tokenizer. "
        "The model's shape comes from the run's config.json unless --model and --flavor are given."))
    if not os.path.isdir(args.checkpoint):
        raise ConfigError(f"checkpoint folder {args.checkpoint!r} does not exist")
    run_config = _run_config_of(args.checkpoint, required=not (args.model and args.flavor))
    import torch

    from plait.hf import export_checkpoint_to_hf
    from plait.plugins import load_model_spec

    spec = load_model_spec(args.model or _from_run(run_config, lambda c: c["model"]["name"]))
    model_args, described = _export_shape(spec, args, run_config)
    export_checkpoint_to_hf(args.checkpoint, spec, model_args, args.output, dtype=getattr(torch, args.dtype))
    tokenizer_note = "without tokenizer files (no run config.json)"
    if run_config:
        from plait.data import build_tokenizer
        from plait.hf import write_tokenizer_files

        data = _from_run(run_config, lambda c: c.get("data", {}))
        tokenizer = build_tokenizer(data.get("tokenizer", ""), bos_token=data.get("bos_token", ""),
                                    eos_token=data.get("eos_token", ""))
        write_tokenizer_files(args.output, tokenizer, max_length=getattr(model_args, spec.seq_len_arg or "", None))
        tokenizer_note = f"with the run's tokenizer ({tokenizer.name})"
    print(f"wrote {described} ({args.dtype}) in Hugging Face format to {args.output}, {tokenizer_note}")
    return 0


def _export_shape(spec: Any, args: ConvertOptions, run_config: dict[str, Any]) -> tuple[Any, str]:
    """The model args to export and how to name them: ``--flavor``'s, else the run's resolved
    shape (any size the architecture allows), else the run's flavor."""
    from plait.model_args import args_from_dict

    if args.flavor or "model_args" not in run_config:
        flavor = args.flavor or _from_run(run_config, lambda c: c["model"]["flavor"])
        return spec.args_for(flavor), f"{spec.name}/{flavor}"
    args_class = type(next(iter(spec.flavors.values())))
    model_args = _from_run(run_config, lambda c: args_from_dict(args_class, c["model_args"]))
    run_model = run_config["model"]
    described = f"{spec.name}/{run_model['flavor']}" if run_model.get("flavor") else \
        f"{spec.name} (shape of {run_model.get('hf_dir')})"
    return model_args, described + (f" with {run_model['args']}" if run_model.get("args") else "")


def _from_run(run_config: dict[str, Any], read: Any) -> Any:
    try:
        return read(run_config)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ConfigError(f"the run's config.json is malformed ({type(error).__name__}: {error}): pass --model "
                          "and --flavor") from None


def _run_config_of(checkpoint: str, *, required: bool) -> dict[str, Any]:
    """The config.json of the run that wrote ``checkpoint`` (up to three folders above it)."""
    folder = os.path.abspath(checkpoint)
    for _ in range(3):
        folder = os.path.dirname(folder)
        candidate = os.path.join(folder, "config.json")
        if os.path.isfile(candidate):
            try:
                with open(candidate) as f:
                    return json.load(f)
            except (OSError, json.JSONDecodeError) as error:
                raise ConfigError(f"cannot read the run's config {candidate}: {error}; pass --model and --flavor") from None
    if required:
        raise ConfigError(f"cannot find the run's config.json above {checkpoint!r}: pass --model and --flavor")
    return {}


if __name__ == "__main__":
    program()
