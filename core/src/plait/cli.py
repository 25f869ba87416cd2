"""`plait` command line: train, plugins, plan, convert.

`plait train` parses in two phases: first the plugin/model selection (--plugins,
--model, --config), then the typed config of the core plus the enabled plugins'
sections, so `--help` shows exactly the options of what is enabled.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import sys
from typing import Any, NoReturn

from plait.errors import ConfigError, PlaitError

USAGE = """usage: plait <command> [options]

commands:
  train      train a model: plait train --config llama3_debugmodel [--section.field value ...]
  plugins    list installed plugins and recipes
  plan       dry run at any scale: memory, parameters and FLOPs per rank, from one process
  convert    export a plait checkpoint to a Hugging Face folder

`plait <command> --help` shows the options of a command."""

logger = logging.getLogger("plait")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    commands = {"train": train_command, "plugins": plugins_command, "plan": plan_command, "convert": convert_command}
    try:
        if command not in commands:
            raise ConfigError(f"unknown command {command!r}; choose one of: {', '.join(commands)}")
        return commands[command](rest)
    except PlaitError as exc:
        print(f"plait: error: {exc}", file=sys.stderr)
        return exc.exit_code


def program() -> NoReturn:
    """The `plait` executable: ``main()`` and its exit code."""
    exit_process(main())


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


# --------------------------------------------------------------------------- selection


@dataclasses.dataclass
class Selection:
    plugins: list[str]
    model: str
    recipe: str
    help: bool


def parse_selection(argv: list[str]) -> tuple[Selection, list[str]]:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--plugins", default="")
    parser.add_argument("--model", default="")
    parser.add_argument("--config", default="")
    parser.add_argument("-h", "--help", action="store_true")
    known, rest = parser.parse_known_args(argv)
    plugins = [p.strip() for p in known.plugins.split(",") if p.strip()]
    return Selection(plugins=plugins, model=known.model, recipe=known.config, help=known.help), rest


def select_plugins(selection: Selection):
    """Enable the model plugin and --plugins; return (manager, base config)."""
    from plait.config import JobConfig
    from plait.plugins import PluginManager, installed_recipes, recipe_owner

    manager = PluginManager()
    base = JobConfig()
    if selection.recipe:
        owner, recipe = recipe_owner(selection.recipe)
        manager.enable([owner])
        base = recipe()
        if not isinstance(base, JobConfig):
            raise ConfigError(f"recipe {selection.recipe!r} must return a plait.config.JobConfig, "
                              f"got {type(base).__name__}")
    if selection.model:
        if selection.recipe and base.model.name and base.model.name != selection.model:
            raise ConfigError(f"--model {selection.model} conflicts with recipe {selection.recipe!r}, "
                              f"which trains {base.model.name!r}: pass one of them")
        base.model.name = selection.model
    if not base.model.name and selection.help:  # help for the core sections and --plugins
        manager.enable(selection.plugins)
        return manager, base
    if not base.model.name:
        models = manager.installed_models()
        raise ConfigError(
            "choose what to train: --config RECIPE (installed: "
            f"{', '.join(installed_recipes()) or 'none'}) or --model NAME (installed: {', '.join(models) or 'none'})"
        )
    manager.enable_model(base.model.name)
    manager.enable(selection.plugins)
    return manager, base


def build_config_class(sections: dict[str, type]) -> type:
    from plait.config import JobConfig

    if not sections:
        return JobConfig
    fields = [(name, cls, dataclasses.field(default_factory=cls)) for name, cls in sections.items()]
    return dataclasses.make_dataclass("JobConfig", fields, bases=(JobConfig,), kw_only=True)


def parse_config(manager, base, argv: list[str], *, prog: str = "plait train"):
    """The full typed config: the base (recipe) with command-line overrides applied."""
    import tyro

    cls = build_config_class(manager.config_sections)
    default = cls(**base.sections(), **{name: section() for name, section in manager.config_sections.items()})
    description = (
        "Train a model. Select first with --config RECIPE and/or --model NAME and --plugins a,b "
        "(enabled plugins add their own sections below). "
        f"Enabled plugins: {', '.join(manager.enabled) or 'none'}."
    )
    return tyro.cli(
        cls,
        default=default,
        args=argv,
        prog=prog,
        description=description,
        use_underscores=True,
        config=(tyro.conf.FlagConversionOff,),
    )


def resolve_train_config(argv: list[str], *, world_size: int | None = None, prog: str = "plait train"):
    """Phase 1 + phase 2 + every check that runs before any work, once: the resolved ``Job``.
    The world size is torchrun's unless given."""
    from plait.job import resolve_job
    from plait.train import world_size_from_env

    selection, rest = parse_selection(argv)
    manager, base = select_plugins(selection)
    if selection.help:
        rest = [*rest, "--help"]
    config = parse_config(manager, base, rest, prog=prog)  # --help prints and exits here
    spec = manager.model_spec(config.model.name)
    return resolve_job(config, manager, spec, world_size_from_env() if world_size is None else world_size)


def write_resolved_config(config, manager) -> str:
    os.makedirs(config.job.dump_folder, exist_ok=True)
    path = os.path.join(config.job.dump_folder, "config.json")
    document = {"plugins": [n for n in manager.enabled], **config.to_dict()}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(document, f, indent=2, sort_keys=False)
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
        path = write_resolved_config(config, manager)
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
    """List installed plugins (name, distribution, version, provides, hooks, enabled)."""
    selection, rest = parse_selection(argv)
    if rest or selection.help:
        print("usage: plait plugins [--plugins a,b] [--model NAME] [--config RECIPE]\n"
              "Lists installed plugins and recipes; with a selection, marks what it enables.")
        return 0 if selection.help else 2
    from plait.plugins import installed_plugins, installed_recipes

    enabled: set[str] = set()
    if selection.recipe or selection.model or selection.plugins:
        manager, _ = select_plugins(selection)
        enabled = set(manager.enabled)
    rows = [("NAME", "DISTRIBUTION", "VERSION", "ENABLED", "PROVIDES", "HOOKS")]
    for name, plugin in installed_plugins().items():
        try:
            module = plugin.import_module()
            provides = ",".join(getattr(module, "PROVIDES", ())) or "-"
            hooks = ",".join(sorted(h[len("plait_"):] for h in dir(module) if h.startswith("plait_"))) or "-"
        except PlaitError as exc:
            provides, hooks = f"(import failed: {exc})", "-"
        rows.append((name, plugin.distribution, plugin.version, "yes" if name in enabled else "no", provides, hooks))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:5])) + "  " + row[5])
    recipes = installed_recipes()
    print(f"\nrecipes ({len(recipes)}): " + (", ".join(recipes) or "none"))
    return 0


def plan_command(argv: list[str]) -> int:
    """`plait plan --world-size N [train options]`: the run's layout and memory per rank."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--world-size", "--world_size", type=int, default=0)
    parser.add_argument("--json", default="")
    parser.add_argument("--device-memory-gib", "--device_memory_gib", type=float, default=0.0)
    known, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        print("usage: plait plan --world-size N [--json FILE] [--device-memory-gib G] "
              "--config RECIPE [--plugins a,b] [the options of plait train]\n\n"
              "Builds the meshes and the parallelized model of the run for N ranks in this one process "
              "(a fake process group stands in for the others), then reports per rank the parameters, "
              "gradients, optimizer state, the activation peak of one micro-batch, the estimated peak "
              "memory and the FLOPs per step. Invalid layouts fail as they would on hardware.\n")
    if known.world_size < 1 and not ("-h" in rest or "--help" in rest):
        raise ConfigError("plait plan needs the number of ranks to plan for: --world-size N (e.g. --world-size 512)")
    if known.device_memory_gib < 0:
        raise ConfigError(f"--device-memory-gib must be >= 0, got {known.device_memory_gib}")
    job = resolve_train_config(rest, world_size=known.world_size, prog="plait plan")
    from plait.plan import format_plan, plan

    result = plan(job)
    print(format_plan(result, device_memory_gib=known.device_memory_gib))
    if known.json:
        with open(known.json, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
    return 0


def convert_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="plait convert",
        description="Export a plait checkpoint (a step-N folder) to a Hugging Face folder that "
        "transformers loads. Model and flavor default to those in the run's config.json.",
    )
    parser.add_argument("checkpoint", help="a checkpoint folder, e.g. outputs/checkpoint/step-50")
    parser.add_argument("output", help="the Hugging Face folder to write")
    parser.add_argument("--model", default="", help="model name (default: from the run's config.json)")
    parser.add_argument("--flavor", default="", help="model flavor (default: from the run's config.json)")
    args = parser.parse_args(argv)
    model, flavor = args.model, args.flavor
    if not (model and flavor):
        run_config = _run_config_of(args.checkpoint)
        model = model or run_config["model"]["name"]
        flavor = flavor or run_config["model"]["flavor"]
    if not os.path.isdir(args.checkpoint):
        raise ConfigError(f"checkpoint folder {args.checkpoint!r} does not exist")
    from plait.hf import export_checkpoint_to_hf
    from plait.plugins import load_model_spec

    spec = load_model_spec(model)
    export_checkpoint_to_hf(args.checkpoint, spec, spec.args_for(flavor), args.output)
    print(f"wrote {model}/{flavor} in Hugging Face format to {args.output}")
    return 0


def _run_config_of(checkpoint: str) -> dict[str, Any]:
    folder = os.path.abspath(checkpoint)
    for _ in range(3):
        folder = os.path.dirname(folder)
        candidate = os.path.join(folder, "config.json")
        if os.path.isfile(candidate):
            with open(candidate) as f:
                return json.load(f)
    raise ConfigError(
        f"cannot find the run's config.json above {checkpoint!r}: pass --model and --flavor"
    )


if __name__ == "__main__":
    program()
