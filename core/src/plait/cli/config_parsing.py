"""The two phases of `plait train` and `plait plan`: the selection, then the typed config
(a recipe or a saved config, the enabled plugins' sections, ``--model.args.*``)."""
from __future__ import annotations

import dataclasses
import json
import os
import textwrap
import typing
from typing import Annotated, Any, Optional

import tyro

from plait.cli.installed import installed_summary
from plait.cli.options import Selection, field_help, parse, wants_help
from plait.errors import ConfigError


def parse_selection(argv: list[str], *, prog: str = "plait train") -> tuple[Selection, list[str]]:
    """Phase 1: the selection; the rest of ``argv`` (--help included) is left for phase 2."""
    return parse(Selection, argv, prog=prog, partial=True)


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
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path} is not text (a binary file?); pass a config.json that plait "
                          "train wrote, or a recipe name") from None
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
    args_help = field_help(args_class) if _has_source(args_class) else {}
    overrides = dataclasses.make_dataclass(
        f"{args_class.__name__}Overrides",
        [(name, Annotated[Optional[kind], tyro.conf.arg(help=args_help.get(name, f"{spec.name} model arg"))],
          dataclasses.field(default=None)) for name, kind in scalar_fields(args_class).items()],
        kw_only=True,
    )
    model_help = field_help(ModelSection)
    hints = typing.get_type_hints(ModelSection)
    fields = [(f.name, Annotated[hints[f.name], tyro.conf.arg(help=model_help.get(f.name))],
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
    # the description (installed plugins, models, recipes) only shows in --help: reading
    # every installed plugin's declarations costs every start ~0.05 s otherwise
    description = _description(prog, manager) if wants_help(argv) else None
    parsed = parse(command, argv, prog=prog, description=description, default=command(**values),
                    selection=selection)
    config = parsed.job_config
    if model_section is not None:
        config.model = _model_from_command_line(config.model, base.model)
    return config


def resolve_train_config(argv: list[str], *, world_size: int | None = None, prog: str = "plait train",
                         options: Any = None, device: Any = None):
    """Phase 1 + phase 2 + every check that runs before any work, once: the resolved ``Job``.
    The world size is torchrun's unless given. ``options``: the calling command's own
    options (e.g. ``PlanOptions``), already parsed, shown by --help. ``device``: the
    device to check against (tests, ``plait.capabilities.simulated_device``)."""
    selection, rest = parse_selection(argv, prog=prog)
    manager, base = select_plugins(selection, for_help=wants_help(rest))
    config = parse_config(manager, base, rest, prog=prog, selection=selection, options=options)  # --help exits here
    from plait.job import resolve_job  # imports torch: after --help and the option errors
    from plait.launch import world_size_from_env

    spec = manager.model_spec(config.model.name)
    return resolve_job(config, manager, spec, world_size_from_env() if world_size is None else world_size,
                       device=device)
