"""`plait generate`: continue prompts with a trained checkpoint or a Hugging Face folder."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from plait.cli.commands import _from_run, _run_config_of
from plait.cli.options import GenerateOptions, parse
from plait.errors import ConfigError

DESCRIPTION = (
    "Continue prompts with a plait checkpoint (--checkpoint RUN/checkpoint/step-N: the model and "
    "tokenizer of the run's config.json) or a Hugging Face folder (--hf-dir). Several prompts are "
    "generated as one left-padded batch with a key/value cache; greedy unless --temperature, --top-k "
    "or --top-p is given."
)


@dataclass(kw_only=True)
class Loaded:
    model: Any
    tokenizer: Any
    max_len: int | None
    """Longest sequence (prompt + new tokens) the model takes; None: no declared limit."""
    described: str


def generate_command(argv: list[str]) -> int:
    options = parse(GenerateOptions, argv, prog="plait generate", description=DESCRIPTION)
    prompts = _prompts(options)
    _check_sampling(options)
    import torch

    device = _device(options.device)
    loaded = _load_from_checkpoint(options) if options.checkpoint else _load_from_hf(options)
    ids = [[loaded.tokenizer.bos_id, *loaded.tokenizer.encode(text)] for text in prompts]
    longest = max(len(row) for row in ids)
    if loaded.max_len is not None and longest + options.max_new_tokens > loaded.max_len:
        which = prompts[max(range(len(ids)), key=lambda i: len(ids[i]))]
        raise ConfigError(
            f"the longest prompt ({longest} tokens with begin-of-text: {which[:40]!r}) plus --max-new-tokens "
            f"{options.max_new_tokens} exceeds the model's maximum length {loaded.max_len}: shorten the prompt "
            "or lower --max-new-tokens"
        )
    input_ids = torch.full((len(ids), longest), loaded.tokenizer.eos_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, tokens in enumerate(ids):  # left padding: every prompt ends at the last column
        input_ids[row, longest - len(tokens):] = torch.tensor(tokens)
        attention_mask[row, longest - len(tokens):] = 1
    model = loaded.model.to(device=device).eval()

    from plait.generation import generate

    sampling = options.temperature > 0 or options.top_k > 0 or options.top_p < 1
    started = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=options.dtype == "bfloat16"):
        output = generate(
            model, input_ids.to(device), attention_mask=attention_mask.to(device),
            max_new_tokens=options.max_new_tokens, temperature=(options.temperature or None) if sampling else None,
            top_k=options.top_k or None, top_p=options.top_p if options.top_p < 1 else None, seed=options.seed,
            eos_token_id=loaded.tokenizer.eos_id, pad_token_id=loaded.tokenizer.eos_id,
            vocab_size=loaded.tokenizer.vocab_size,
        ).cpu()
    seconds = time.perf_counter() - started
    produced = 0
    for number, (text, row) in enumerate(zip(prompts, output[:, longest:].tolist()), start=1):
        new = row[: row.index(loaded.tokenizer.eos_id)] if loaded.tokenizer.eos_id in row else row
        produced += len(new) + (len(new) < len(row))  # the end-of-text token is generated too
        print(f"--- {number}: {text}")
        print(text + loaded.tokenizer.decode(new))
    mode = "sampled" if sampling else "greedy"
    print(f"{loaded.described}: {produced} tokens ({mode}) in {seconds:.2f} s, "
          f"{produced / max(seconds, 1e-9):,.1f} tokens/s on {device}")  # fmt: skip
    return 0


def _prompts(options: GenerateOptions) -> list[str]:
    if bool(options.checkpoint) == bool(options.hf_dir):
        raise ConfigError("pass exactly one of --checkpoint RUN/checkpoint/step-N and --hf-dir DIR")
    prompts = list(options.prompt)
    if options.prompt_file:
        try:
            with open(options.prompt_file) as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as error:
            raise ConfigError(f"--prompt-file {options.prompt_file}: {error.strerror or error}") from None
    if not prompts:
        raise ConfigError("no prompt: pass --prompt TEXT (repeat it for several) or --prompt-file FILE")
    return prompts


def _check_sampling(options: GenerateOptions) -> None:
    if options.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {options.max_new_tokens}")
    if options.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0 (0 with neither --top-k nor --top-p: greedy), "
                          f"got {options.temperature}")  # fmt: skip
    if options.top_k < 0:
        raise ConfigError(f"--top-k must be >= 0 (0: no limit), got {options.top_k}")
    if not 0 < options.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1] (1: no limit), got {options.top_p}")


def _device(name: str) -> Any:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"--device {name!r} is not a device ({error}); e.g. cpu or cuda") from None
    if device.type != "cpu":
        backend = getattr(torch, device.type, None)
        if backend is None or not backend.is_available():
            raise ConfigError(f"--device {name}: no {device.type} device is available here; use --device cpu")
    return device


def _tokenizer(path: str, *, bos_token: str = "", eos_token: str = "", what: str) -> Any:
    from plait.data import build_tokenizer

    if path and not (os.path.isfile(path) or os.path.isfile(os.path.join(path, "tokenizer.json"))):
        raise ConfigError(f"no tokenizer: {what} {path} holds no tokenizer.json; pass --tokenizer PATH")
    return build_tokenizer(path, bos_token=bos_token, eos_token=eos_token)


def _max_len(spec: Any, model_args: Any) -> int | None:
    return getattr(model_args, spec.seq_len_arg) if spec.seq_len_arg else None


def _load_from_checkpoint(options: GenerateOptions) -> Loaded:
    """The run's model (its recorded shape) with the checkpoint's weights, and its tokenizer."""
    checkpoint = options.checkpoint
    if not os.path.isdir(checkpoint):
        raise ConfigError(f"--checkpoint {checkpoint!r} is not a folder: pass a step folder such as "
                          "RUN/checkpoint/step-N")  # fmt: skip
    run = _run_config_of(checkpoint, required=True)
    from plait.model_args import args_from_dict
    from plait.plugins import load_model_spec

    spec = load_model_spec(options.model or _from_run(run, lambda c: c["model"]["name"]))
    if "model_args" in run:
        args_class = type(next(iter(spec.flavors.values())))
        model_args = _from_run(run, lambda c: args_from_dict(args_class, c["model_args"]))
    else:
        model_args = _from_run(run, lambda c: spec.args_for_run(c["model"]["flavor"], c["training"]["seq_len"]))
    data = _from_run(run, lambda c: c.get("data", {}))
    tokenizer = _tokenizer(options.tokenizer or data.get("tokenizer", ""), bos_token=data.get("bos_token", ""),
                           eos_token=data.get("eos_token", ""), what="the run's --data.tokenizer")  # fmt: skip
    from plait.checkpoint import load_model_state

    model = spec.build_initialized(model_args)
    load_model_state(checkpoint, model.state_dict())
    return Loaded(model=model, tokenizer=tokenizer, max_len=_max_len(spec, model_args),
                  described=f"{spec.name} from {checkpoint}")  # fmt: skip


def _load_from_hf(options: GenerateOptions) -> Loaded:
    import plait
    from plait.hf import read_hf_config
    from plait.plugins import load_model_spec

    hf_dir = options.hf_dir
    if not os.path.isdir(hf_dir):
        raise ConfigError(f"--hf-dir {hf_dir!r} is not a folder")
    tokenizer = _tokenizer(options.tokenizer or hf_dir, what="--tokenizer" if options.tokenizer else "--hf-dir")
    name = options.model or _model_reading(read_hf_config(hf_dir), hf_dir)
    model = plait.from_pretrained(name, hf_dir)
    spec = load_model_spec(name)
    return Loaded(model=model, tokenizer=tokenizer, max_len=_max_len(spec, model.args) if hasattr(model, "args")
                  else None, described=f"{name} from {hf_dir}")  # fmt: skip


def _model_reading(hf_config: dict[str, Any], hf_dir: str) -> str:
    """The installed model whose HF adapter reads the folder's architecture."""
    from plait.plugins import PluginManager, load_model_spec

    architectures = set(hf_config.get("architectures") or [])
    for name in PluginManager().installed_models():
        try:
            adapter = load_model_spec(name).hf_adapter
        except Exception:  # noqa: BLE001 - a model that cannot load reads nothing here
            continue
        if adapter is not None and architectures & set(adapter.hf_architectures):
            return name
    raise ConfigError(f"no installed model reads {hf_dir} ({', '.join(sorted(architectures)) or 'no architectures'} "
                      "in its config.json): pass --model NAME")  # fmt: skip
