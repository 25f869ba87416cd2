"""The commands: train, plugins, plan, convert."""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import shutil
import sys
from typing import Any, Iterator

from plait.cli.config_parsing import resolve_train_config, select_plugins
from plait.cli.installed import installed_summary
from plait.cli.options import (ConvertOptions, PlanOptions, PreprocessOptions, Selection, TrainOptions, parse,
                               wants_help, with_flag_values)
from plait.errors import ConfigError, describe_os_error


logger = logging.getLogger("plait")


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


def resolved_config_text(config, manager, model_args: Any = None) -> str:
    """The run's config as JSON: enabled plugins, every section, and the resolved model args."""
    from plait.model_args import args_to_dict

    document = {"plugins": [n for n in manager.enabled], **config.to_dict()}
    if model_args is not None and dataclasses.is_dataclass(model_args):
        document["model_args"] = args_to_dict(model_args)
    return json.dumps(document, indent=2, sort_keys=False, default=str)


def write_resolved_config(config, manager, model_args: Any = None) -> str:
    """The run's config as ``<dump_folder>/config.json`` (``--config`` loads it back), and
    a copy per attempt in ``<dump_folder>/configs/attempt-N.json``, which later attempts
    never overwrite. ``model_args``: the resolved model args, recorded for reading (and
    for ``plait convert``)."""
    attempts = os.path.join(config.job.dump_folder, "configs")
    os.makedirs(attempts, exist_ok=True)
    text = resolved_config_text(config, manager, model_args)
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


def train_command(argv: list[str]) -> int:
    result = train(argv)
    if result is not None and result.stopped_by_signal:
        logger.info("stopped at step %d on a signal; checkpoint saved, resume with the same command",
                    result.last_step)
    return 0


def train(argv: list[str]):
    """`plait train ARGV` in this process; returns the ``TrainResult`` (losses by step),
    or None with --print-config."""
    options, rest = parse(TrainOptions, with_flag_values(argv, ("--print_config",)), prog="plait train", partial=True)
    job = resolve_train_config(rest, options=options)
    config, manager = job.config, job.plugins
    if options.print_config:
        print(resolved_config_text(config, manager, job.declared_model_args))
        return None
    from plait.launch import rank_from_env

    rank = rank_from_env()
    setup_logging(rank)
    run_lock = None
    if rank == 0:
        dump = config.job.dump_folder
        check_writable_folder(dump, "--job.dump_folder")
        # a job that does not write the run's checkpoints (another job does) reads them only
        saves = config.checkpoint.enable and job.needs.writes_checkpoints
        for enabled, sub, option in ((saves, config.checkpoint.folder, "--checkpoint.folder"),
                                     (config.metrics.enable_tensorboard, config.metrics.tensorboard_folder,
                                      "--metrics.tensorboard_folder")):
            if enabled:
                check_writable_folder(os.path.join(dump, sub), option)
        if saves:  # a second run on this folder stops before it writes anything
            from plait.checkpoint.layout import remove_leftovers
            from plait.checkpoint.lock import acquire

            run_lock = acquire(os.path.join(dump, config.checkpoint.folder))
            # An unfinished save of a run that died (of a full disk, say) goes before this
            # run writes anything: the space it holds may be what the run needs.
            remove_leftovers(os.path.join(dump, config.checkpoint.folder))
        path = write_resolved_config(config, manager, job.declared_model_args)
        if saves and job.needs.job_folder:  # shared checkpoints: plait convert/generate find the config above them
            run_folder = os.path.dirname(os.path.normpath(os.path.join(dump, config.checkpoint.folder)))
            shutil.copyfile(path, os.path.join(run_folder, "config.json"))
        logger.info("plugins: %s; resolved config: %s", ", ".join(manager.enabled), path)
    try:
        from plait.train import Trainer

        trainer = Trainer(job)
        try:
            return trainer.train()
        finally:
            trainer.close()
            del trainer
            gc.collect()  # free what held process groups and tensors while the interpreter is whole
    finally:
        if run_lock is not None:
            run_lock.release()


def plugins_command(argv: list[str]) -> int:
    """List installed plugins (name, distribution, version, enabled, provides, description)."""
    selection = parse(Selection, argv, prog="plait plugins", description=(
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
    options, rest = parse(PlanOptions, argv, prog="plait plan", partial=True)
    if not wants_help(rest):
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


def preprocess_command(argv: list[str]) -> int:
    """`plait preprocess --output FOLDER [train options]`: the model's preprocessing step
    (``ModelSpec.preprocess``) over the run's dataset, written whole or not at all."""
    options, rest = parse(PreprocessOptions, argv, prog="plait preprocess", partial=True)
    if not wants_help(rest) and not options.output:
        raise ConfigError("plait preprocess needs the folder to write: --output FOLDER "
                          "(then train with --data.dataset FOLDER)")
    job = resolve_train_config(rest, world_size=1, prog="plait preprocess", options=options)
    if job.spec.preprocess is None:
        raise ConfigError(f"model {job.spec.name!r} has no preprocessing step: it reads its data as it trains "
                          "(plait preprocess runs a step a model spec declares, such as flux's encoders)")
    setup_logging(0)
    with _staged_output(options.output) as staging:
        summary = job.spec.preprocess(job, staging)
    print(f"wrote {summary} to {options.output}; train on it with --data.dataset {options.output}")
    return 0


def convert_command(argv: list[str]) -> int:
    args = parse(ConvertOptions, argv, prog="plait convert", description=(
        "Export a plait checkpoint (a step-N folder) to a Hugging Face folder that transformers "
        "loads and generates from: weights, config, generation config and the run's tokenizer. "
        "The model's shape comes from the run's config.json unless --model and --flavor are given. "
        "--format NAME writes one safetensors file in another layout the model names instead (flux: bfl)."))
    if not os.path.isdir(args.checkpoint):
        raise ConfigError(f"checkpoint folder {args.checkpoint!r} does not exist")
    run_config = _run_config_of(args.checkpoint, required=not (args.model and args.flavor))
    import torch

    from plait.hf import export_checkpoint_to_hf
    from plait.plugins import load_model_spec

    spec = load_model_spec(args.model or _from_run(run_config, lambda c: c["model"]["name"]))
    model_args, described = _export_shape(spec, args, run_config)
    if args.format != "hf":
        return _convert_to_file(args, spec, model_args, described)
    with _staged_output(args.output) as staging:
        export_checkpoint_to_hf(args.checkpoint, spec, model_args, staging, dtype=getattr(torch, args.dtype))
        tokenizer_note = "without tokenizer files (no run config.json)"
        if run_config and not spec.token_inputs:  # a model with its own data pipeline has no tokenizer
            tokenizer_note = "weights and config only"
        elif run_config:
            from plait.data import build_tokenizer
            from plait.hf import write_tokenizer_files

            data = _from_run(run_config, lambda c: c.get("data", {}))
            tokenizer = build_tokenizer(data.get("tokenizer", ""), bos_token=data.get("bos_token", ""),
                                        eos_token=data.get("eos_token", ""))
            write_tokenizer_files(staging, tokenizer, max_length=getattr(model_args, spec.seq_len_arg or "", None))
            tokenizer_note = f"with the run's tokenizer ({tokenizer.name})"
    print(f"wrote {described} ({args.dtype}) in Hugging Face format to {args.output}, {tokenizer_note}")
    return 0


def _convert_to_file(args: ConvertOptions, spec: Any, model_args: Any, described: str) -> int:
    """``plait convert --format NAME``: one safetensors file, written beside and renamed."""
    import torch

    from plait.hf import export_checkpoint_to_file

    output = os.path.abspath(args.output)
    if os.path.lexists(output):
        raise ConfigError(f"{output} already exists; choose a new output file")
    check_writable_folder(os.path.dirname(output), "the output file's folder")
    partial = os.path.join(os.path.dirname(output), f".{os.path.basename(output)}.partial")
    try:
        export_checkpoint_to_file(args.checkpoint, spec, model_args, partial, args.format,
                                  dtype=getattr(torch, args.dtype))
        os.rename(partial, output)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    print(f"wrote {described} ({args.dtype}) as a {args.format} file to {output}")
    return 0


@contextlib.contextmanager
def _staged_output(output: str) -> Iterator[str]:
    """A hidden folder beside ``output`` to write into, renamed to ``output`` when all is
    written and removed otherwise (a full disk, an error): ``output`` appears whole or not
    at all. Where it cannot be written is a ConfigError before any work."""
    import shutil
    import tempfile

    output = os.path.abspath(output)
    if os.path.lexists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise ConfigError(f"{output} already exists and is not an empty folder; choose a new output folder")
    parent = os.path.dirname(output)
    check_writable_folder(parent, "the output folder's parent")
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(output)}.partial-")
    try:
        yield staging
        os.rename(staging, output)  # replaces an empty folder
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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
