"""The options of the commands as dataclasses, and the one way plait parses them."""
from __future__ import annotations

import ast
import dataclasses
import difflib
import typing
from typing import Annotated, Any, Literal, NoReturn

import tyro

from plait.cli.installed import plugin_info, section_owners
from plait.errors import ConfigError


TYRO_CONFIG = (tyro.conf.FlagConversionOff,)


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
class TrainOptions:
    """Options of `plait train` (besides the run's config)."""

    print_config: bool = False
    """Print the resolved config (what the run folder's config.json would hold, which
    --config loads back) and exit without training (--print-config works too)."""


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
class PreprocessOptions:
    """Options of `plait preprocess` (besides those of `plait train`)."""

    output: Annotated[str, tyro.conf.arg(metavar="FOLDER")] = ""
    """The folder to write (new or empty); train with --data.dataset FOLDER (required)."""


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
    format: Annotated[str, tyro.conf.arg(metavar="NAME")] = "hf"
    """hf: a Hugging Face folder; another name: one safetensors file OUTPUT in a layout the
    model's adapter names (flux: bfl, a Black Forest Labs single file)."""


def with_flag_values(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """Lets the boolean ``flags`` (e.g. ``--print_config``) stand alone, as a switch: every
    other boolean option takes a value (--checkpoint.enable False), so these get True."""
    result: list[str] = []
    for index, token in enumerate(argv):
        result.append(token)
        following = argv[index + 1] if index + 1 < len(argv) else ""
        if token.replace("-", "_").lstrip("_") in {f.lstrip("-") for f in flags} and \
                following.lower() not in ("true", "false"):
            result.append("True")
    return result


@dataclasses.dataclass(kw_only=True)
class GenerateOptions:
    """Options of `plait generate`."""

    checkpoint: Annotated[str, tyro.conf.arg(metavar="DIR")] = ""
    """A plait checkpoint folder, e.g. outputs/checkpoint/step-50 (model and tokenizer from the run's config.json)."""
    hf_dir: Annotated[str, tyro.conf.arg(metavar="DIR")] = ""
    """A Hugging Face model folder (config.json, safetensors, tokenizer.json) instead of --checkpoint."""
    model: Annotated[str, tyro.conf.arg(metavar="NAME")] = ""
    """Model name for --hf-dir (default: the installed model that reads its architecture)."""
    tokenizer: Annotated[str, tyro.conf.arg(metavar="PATH")] = ""
    """A tokenizer.json (or a folder holding one) instead of the run's or the folder's."""
    prompt: Annotated[tuple[str, ...], tyro.conf.UseAppendAction, tyro.conf.arg(metavar="TEXT")] = ()
    """A prompt to continue; repeat the option for several (generated as one left-padded batch)."""
    prompt_file: Annotated[str, tyro.conf.arg(metavar="FILE")] = ""
    """A file of prompts, one per line (added to the --prompt ones)."""
    max_new_tokens: Annotated[int, tyro.conf.arg(metavar="N")] = 64
    """Most tokens to generate per prompt (a prompt stops earlier at end of text)."""
    temperature: Annotated[float, tyro.conf.arg(metavar="T")] = 0.0
    """Sampling temperature (0: 1 when --top-k or --top-p is given, else greedy: the most likely token each time)."""
    top_k: Annotated[int, tyro.conf.arg(metavar="K")] = 0
    """Sample only from the K most likely tokens (0: no limit)."""
    top_p: Annotated[float, tyro.conf.arg(metavar="P")] = 1.0
    """Sample only from the most likely tokens whose probabilities add up to P, in (0, 1] (1: no limit)."""
    seed: Annotated[int, tyro.conf.arg(metavar="N")] = 0
    """Seed of the sampler: the same seed gives the same samples."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype (bfloat16: autocast; the weights stay float32)."""
    device: Annotated[str, tyro.conf.arg(metavar="DEVICE")] = "cpu"
    """Device to run on, e.g. cpu or cuda (cuda:1)."""


def parse(cls: type, argv: list[str], *, prog: str, description: str | None = None,
           default: Any = tyro.MISSING_NONPROP, partial: bool = False,
           selection: Selection | None = None) -> Any:
    """The one way plait parses a command line. ``partial``: phase 1 of a two-phase parse,
    which returns (parsed, the args left) and leaves --help to phase 2. Otherwise an option
    that ``cls`` lacks is one ``ConfigError`` with close matches (or the plugin that adds it)."""
    parsed, unknown = tyro.cli(cls, args=argv, prog=prog, description=description, default=default,
                               return_unknown_args=True, add_help=not partial, use_underscores=True,
                               config=TYRO_CONFIG)
    if partial:
        return parsed, unknown
    if unknown:
        _reject_unknown(unknown, cls, prog, selection or Selection())
    return parsed


def _option_names(cls: type, prefix: str = "") -> list[str]:
    """``--section.field`` names of a dataclass as plait parses it (for suggestions only)."""
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


def wants_help(argv: list[str]) -> bool:
    return "-h" in argv or "--help" in argv


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
        owners = section_owners() if owners is None else owners
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


def field_help(cls: type) -> dict[str, str]:
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
