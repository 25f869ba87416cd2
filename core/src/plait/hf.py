"""Hugging Face checkpoint folders: read, write, and load into a registered model.

A folder holds ``config.json`` and the weights as safetensors: either one
``model.safetensors`` or shards listed by ``model.safetensors.index.json`` (diffusers
names them ``diffusion_pytorch_model*``; both are read, and an adapter's
``hf_weights_name`` picks the name written). Names, configs and tensor layouts are
converted by the model spec's ``hf_adapter``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plait.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from plait.model_spec import HFAdapter, ModelSpec

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: the file-name stems of the weights: transformers' and diffusers'
WEIGHTS_NAMES = ("model", "diffusion_pytorch_model")
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

_EXPECTED = f"a Hugging Face model folder with {CONFIG_FILE} and either {SINGLE_FILE} or {INDEX_FILE} plus its shards"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not text (a binary file?); expected {_EXPECTED}") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON ({error}); expected {_EXPECTED}") from None


def _weight_files(folder: Path) -> list[Path]:
    for stem in WEIGHTS_NAMES[1:]:
        if (folder / f"{stem}.safetensors.index.json").is_file() or (folder / f"{stem}.safetensors").is_file():
            return _weight_files_named(folder, stem)
    return _weight_files_named(folder, WEIGHTS_NAMES[0])


def _weight_files_named(folder: Path, stem: str) -> list[Path]:
    index_path = folder / f"{stem}.safetensors.index.json"
    if index_path.is_file():
        index = _read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(f"{index_path} has no 'weight_map'; expected {_EXPECTED}")
        if not all(isinstance(name, str) for name in weight_map.values()):
            raise ConfigError(f"{index_path}: 'weight_map' must map tensor names to file names; expected {_EXPECTED}")
        names = sorted(set(weight_map.values()))
        for name in names:
            # A shard lies in the folder: no absolute path, no "..". (Links are followed:
            # the HF cache links each shard to its blob.)
            parts = name.replace("\\", "/").split("/")
            if not name or name.startswith(("/", "\\")) or ":" in name or ".." in parts:
                raise ConfigError(
                    f"{index_path} lists the weight file {name!r}, which lies outside {folder}: "
                    f"an index may name only files inside its folder; fix or re-download the folder"
                )
        shards = [folder / name for name in names]
        absent = [shard.name for shard in shards if not shard.is_file()]
        if absent:
            raise ConfigError(f"{folder} lacks the shard(s) {', '.join(absent)} listed in {index_path.name}")
        return shards
    if (folder / f"{stem}.safetensors").is_file():
        return [folder / f"{stem}.safetensors"]
    hint = ""
    if any(folder.glob("*.bin")) or any(folder.glob("*.pth")):
        hint = " (it holds .bin/.pth weights: re-save them as safetensors with save_pretrained)"
    raise ConfigError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}{hint}; expected {_EXPECTED}")


def read_hf_config(hf_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.json`` of an HF folder, as a dict."""
    folder = Path(hf_dir)
    if not folder.is_dir():
        raise ConfigError(f"HF checkpoint folder {folder} does not exist; expected {_EXPECTED}")
    if not (folder / CONFIG_FILE).is_file():
        raise ConfigError(f"{folder} has no {CONFIG_FILE}; expected {_EXPECTED}")
    hf_config = _read_json(folder / CONFIG_FILE)
    if not isinstance(hf_config, dict):
        raise ConfigError(f"{folder / CONFIG_FILE} must hold a JSON object; expected {_EXPECTED}")
    return hf_config


#: Sizes in an HF ``config.json`` that must be positive integers where given (None: the
#: adapter's default) ...
POSITIVE_SIZES = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
    "intermediate_size", "head_dim", "max_position_embeddings", "moe_intermediate_size", "num_experts",
    "num_local_experts", "num_experts_per_tok", "n_routed_experts", "kv_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "v_head_dim", "n_group", "topk_group",
)
#: ... and the counts that may be zero.
COUNTS = ("first_k_dense_replace", "n_shared_experts", "q_lora_rank", "decoder_sparse_step")


def check_hf_sizes(hf_config: dict[str, Any], where: str) -> None:
    """The sizes of an HF ``config.json`` are integers of the right sign, and the attention
    heads group evenly: one message naming every bad field, before an adapter reads them."""
    problems = []
    for key in (*POSITIVE_SIZES, *COUNTS):
        value = hf_config.get(key)
        if value is None:
            continue
        least = 1 if key in POSITIVE_SIZES else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            need = "a positive integer" if least else "an integer >= 0"
            problems.append(f"{key} must be {need}, got {value!r}")
    heads, kv_heads = hf_config.get("num_attention_heads"), hf_config.get("num_key_value_heads")
    if not problems and isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads:
        problems.append(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems) + ". Fix the file or re-download the model folder")


def hf_model_args_of(adapter: HFAdapter, model_name: str, hf_config: dict[str, Any], hf_dir: str) -> Any:
    """The model args an HF ``config.json`` describes, through ``adapter``: the
    architecture and the sizes are checked first, and what the adapter cannot read is a
    ``ConfigError`` naming the folder."""
    where = f"{hf_dir}/{CONFIG_FILE}"
    architectures = hf_config.get("architectures") or []
    if not isinstance(architectures, list):
        raise ConfigError(f"{where}: architectures must be a list of class names, got {architectures!r}")
    if architectures and not set(architectures) & set(adapter.hf_architectures):
        raise ConfigError(
            f"{hf_dir} holds a {', '.join(map(str, architectures))} checkpoint; model {model_name!r} reads "
            f"{', '.join(adapter.hf_architectures)}"
        )
    check_hf_sizes(hf_config, where)
    try:
        return adapter.args_from_hf_config(hf_config)
    except (KeyError, TypeError, ValueError, ArithmeticError) as error:
        raise ConfigError(f"{where} does not describe a {model_name} model: {error!r}") from None


def load_hf_folder(hf_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read ``config.json`` and every tensor of an HF folder (on CPU, dtypes as stored)."""
    from safetensors.torch import load_file

    folder = Path(hf_dir)
    hf_config = read_hf_config(folder)

    state_dict: dict[str, torch.Tensor] = {}
    for shard in _weight_files(folder):
        try:
            state_dict.update(load_file(shard))
        except Exception as error:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {shard}: {error}") from error
    return hf_config, state_dict


def _plain_tensor(tensor: torch.Tensor) -> torch.Tensor:
    full_tensor = getattr(tensor, "full_tensor", None)  # a DTensor from a sharded model
    if full_tensor is not None:
        tensor = full_tensor()
    return tensor.detach().cpu().contiguous()


def _shard(tensors: dict[str, torch.Tensor], max_shard_bytes: int, weights_name: str = WEIGHTS_NAMES[0]
           ) -> tuple[dict[str, list[str]], int]:  # fmt: skip
    """File name -> tensor names, and the total bytes, as ``huggingface_hub`` splits them:
    in key order, a new shard when the next tensor would pass ``max_shard_bytes``, a
    tensor larger than that alone in its own shard; one ``model.safetensors`` when all fit.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(
        tensors, filename_pattern=weights_name + "{suffix}.safetensors", max_shard_size=max_shard_bytes
    )
    return split.filename_to_tensors or {f"{weights_name}.safetensors": []}, split.metadata["total_size"]


def save_hf_folder(
    out_dir: str | os.PathLike[str],
    hf_config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    weights_name: str = WEIGHTS_NAMES[0],
) -> None:
    """Write ``config.json`` and the tensors as safetensors, sharded with an index when
    they exceed ``max_shard_bytes``, in the layout ``from_pretrained`` of transformers reads
    (of diffusers with ``weights_name="diffusion_pytorch_model"``).

    ``out_dir`` must be new or empty, so that no stale shard is ever mixed in.
    """
    from safetensors.torch import save_file

    if max_shard_bytes <= 0:
        raise ConfigError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    folder = Path(out_dir)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(f"{folder} already exists and is not an empty folder; choose a new output folder")
    folder.mkdir(parents=True, exist_ok=True)

    tensors: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for name, tensor in state_dict.items():
        tensor = _plain_tensor(tensor)
        storage = tensor.untyped_storage()
        # safetensors refuses shared memory, and the shard sizes count whole storages:
        # a view of a larger tensor (a slice of a fused weight) gets its own copy.
        if storage.data_ptr() in seen_storage or storage.nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        seen_storage.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor

    config = dict(hf_config)
    floating = [t for t in tensors.values() if t.is_floating_point()]
    # transformers reads the dtype from config.json; diffusers refuses keys it does not know
    if floating and "dtype" not in config and "torch_dtype" not in config and weights_name == WEIGHTS_NAMES[0]:
        config["dtype"] = str(floating[0].dtype).removeprefix("torch.")

    files, total_size = _shard(tensors, max_shard_bytes, weights_name)
    metadata = {"format": "pt"}
    for file_name, names in files.items():
        save_file({name: tensors[name] for name in names}, folder / file_name, metadata=metadata)
    if len(files) > 1:
        weight_map = {name: file_name for file_name, names in files.items() for name in names}
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (folder / f"{weights_name}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _adapter(spec: ModelSpec) -> HFAdapter:
    if spec.hf_adapter is None:
        raise ConfigError(f"model {spec.name!r} has no Hugging Face adapter; it cannot read or write HF checkpoints")
    return spec.hf_adapter


def _load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    mismatched = [
        f"{name} {tuple(tensor.shape)} vs {tuple(expected[name].shape)}"
        for name, tensor in state_dict.items()
        if name in expected and tuple(tensor.shape) != tuple(expected[name].shape)
    ]
    if mismatched:
        raise CheckpointError(f"{source}: tensor shapes differ from the model's: " + "; ".join(mismatched[:5]))
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: state dict mismatch; missing: {missing[:5]}; unexpected: {unexpected[:5]}")
    model.load_state_dict(state_dict)


def from_pretrained(
    model_name: str,
    hf_dir: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    **arg_overrides: Any,
) -> nn.Module:
    """Build ``model_name`` from an HF folder: fp32, eval mode, on ``device``.

    ``arg_overrides`` replace fields of the model args read from ``config.json``
    (e.g. ``max_seq_len=4096`` for a shorter RoPE cache).
    """
    from plait.model_args import replace_args
    from plait.plugins import load_model_spec

    spec = load_model_spec(model_name)
    adapter = _adapter(spec)
    hf_config, hf_state_dict = load_hf_folder(hf_dir)
    args = replace_args(hf_model_args_of(adapter, model_name, hf_config, str(hf_dir)), arg_overrides,
                        where="from_pretrained")

    model = spec.build_initialized(args, device=device)
    state_dict = {name: tensor.float() for name, tensor in adapter.from_hf(hf_state_dict, args).items()}
    _load_into(model, state_dict, str(hf_dir))
    return model.float().eval()


def export_checkpoint_to_hf(
    checkpoint_dir: str | os.PathLike[str],
    spec: ModelSpec,
    args: Any,
    out_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Write the model weights of a plait (DCP) checkpoint as an HF folder.

    ``dtype`` casts floating tensors (e.g. ``torch.bfloat16``); None keeps the stored fp32.
    """
    from plait.checkpoint import load_model_state
    from plait.meta_init import materialize

    adapter = _adapter(spec)
    state_dict = materialize(spec.build_meta(args), "cpu").state_dict()
    load_model_state(str(checkpoint_dir), state_dict)
    hf_state_dict = adapter.to_hf(state_dict, args)
    if dtype is not None:
        hf_state_dict = {k: t.to(dtype) if t.is_floating_point() else t for k, t in hf_state_dict.items()}
    save_hf_folder(out_dir, adapter.hf_config_from_args(args), hf_state_dict, max_shard_bytes=max_shard_bytes,
                   weights_name=getattr(adapter, "hf_weights_name", WEIGHTS_NAMES[0]))


def export_checkpoint_to_file(
    checkpoint_dir: str | os.PathLike[str], spec: ModelSpec, args: Any, path: str | os.PathLike[str], file_format: str,
    *, dtype: torch.dtype | None = None,
) -> None:  # fmt: skip
    """Write the model weights of a plait (DCP) checkpoint as one safetensors file in one of
    the adapter's ``file_formats``."""
    from safetensors.torch import save_file

    from plait.checkpoint import load_model_state
    from plait.meta_init import materialize

    formats = getattr(_adapter(spec), "file_formats", {})
    if file_format not in formats:
        raise ConfigError(f"--format {file_format!r}: model {spec.name!r} writes no such file; its formats: "
                          + ", ".join(["hf (a Hugging Face folder)", *formats]))
    state_dict = materialize(spec.build_meta(args), "cpu").state_dict()
    load_model_state(str(checkpoint_dir), state_dict)
    tensors = formats[file_format](state_dict, args)
    if dtype is not None:
        tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
    save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, str(path), metadata={"format": "pt"})


def write_tokenizer_files(out_dir: str | os.PathLike[str], tokenizer: Any, *, max_length: int | None = None) -> None:
    """The run's tokenizer beside exported weights, as transformers' ``AutoTokenizer``
    reads it (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``),
    its begin/end-of-text ids in ``config.json`` and a ``generation_config.json`` (greedy
    by default, stopping at end of text, padding with it)."""
    folder = Path(out_dir)
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    bos, eos = tokenizer.backend.id_to_token(tokenizer.bos_id), tokenizer.backend.id_to_token(tokenizer.eos_id)
    special = {"bos_token": bos, "eos_token": eos, "pad_token": eos}
    tokenizer_config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                                        **special}
    if max_length:
        tokenizer_config["model_max_length"] = max_length
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.eos_id}
    config = _read_json(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else {}
    generation: dict[str, Any] = {**ids, "do_sample": False}
    model_vocab = config.get("vocab_size")
    if isinstance(model_vocab, int) and model_vocab > tokenizer.vocab_size:
        # Rows that pad the vocabulary were masked out of training (never pushed down):
        # transformers must not sample them either.
        generation["suppress_tokens"] = list(range(tokenizer.vocab_size, model_vocab))
    documents = {
        "tokenizer_config.json": tokenizer_config,
        "special_tokens_map.json": special,
        "generation_config.json": generation,
        CONFIG_FILE: {**config, **ids},
    }
    for name, document in documents.items():
        (folder / name).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
