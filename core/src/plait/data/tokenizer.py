"""The tokenizer: a Hugging Face ``tokenizers`` file plus its begin/end-of-text ids."""
from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers

from plait.errors import ConfigError

BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")


class Tokenizer:
    """Text <-> token ids. ``encode`` adds no special tokens, and special-token strings
    that appear inside a text (say a literal ``<|end_of_text|>``) are encoded as plain
    text: only the data loader places bos/eos, framing each document as
    ``bos + tokens + eos``."""

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_id: int, eos_id: int, name: str) -> None:
        backend.encode_special_tokens = True
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.name = name
        # Ids may have holes (added tokens past the base vocabulary); the model's
        # embedding must cover the largest id.
        self.vocab_size: int = max(backend.get_vocab(with_added_tokens=True).values()) + 1

    @functools.cached_property
    def fingerprint(self) -> str:
        """Identifies what the tokenizer does (its whole definition and the begin/end-of-text
        ids), not where its file lies: a run resumes only with the tokenizer it trained with."""
        digest = hashlib.sha256(self.backend.to_str().encode())
        digest.update(f"\0{self.bos_id}\0{self.eos_id}".encode())
        return digest.hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once, in parallel in native code."""
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [encoding.ids for encoding in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"


def load_tokenizer_file(path: str, *, bos_token: str = "", eos_token: str = "") -> Tokenizer:
    """A ``tokenizer.json`` (or an HF tokenizer folder holding one). Its begin/end-of-text
    tokens: ``bos_token``/``eos_token`` when given, else those its ``tokenizer_config.json``
    or ``special_tokens_map.json`` name, else the usual names."""
    file = _resolve_tokenizer_file(Path(path).expanduser())
    try:
        backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as error:  # the library raises bare Exceptions for malformed files
        raise ConfigError(
            f"--data.tokenizer {path}: {file} is not a valid Hugging Face tokenizers file ({error}). "
            "Pass a tokenizer.json saved by the `tokenizers` or `transformers` library, "
            "or leave --data.tokenizer empty for the embedded tokenizer."
        ) from None
    declared = {**_declared_special_tokens(file.parent), **_overrides(bos_token, eos_token)}
    bos_id, eos_id = _special_ids(backend, declared=declared, where=str(file), required=_overrides(bos_token, eos_token))
    return Tokenizer(backend, bos_id=bos_id, eos_id=eos_id, name=str(file))


def with_special_tokens(tokenizer: Tokenizer, *, bos_token: str = "", eos_token: str = "") -> Tokenizer:
    """``tokenizer`` with the named begin/end-of-text tokens (``--data.bos_token/eos_token``)."""
    overrides = _overrides(bos_token, eos_token)
    if not overrides:
        return tokenizer
    bos_id, eos_id = _special_ids(tokenizer.backend, declared=overrides, where=tokenizer.name, required=overrides)
    return Tokenizer(tokenizer.backend, bos_id=bos_id if bos_token else tokenizer.bos_id, eos_id=eos_id,
                     name=tokenizer.name)


def _overrides(bos_token: str, eos_token: str) -> dict[str, str]:
    return {key: value for key, value in (("bos_token", bos_token), ("eos_token", eos_token)) if value}


def tokenizer_from_json(text: str, *, name: str) -> Tokenizer:
    backend = tokenizers.Tokenizer.from_str(text)
    bos_id, eos_id = _special_ids(backend, declared={}, where=name)
    return Tokenizer(backend, bos_id=bos_id, eos_id=eos_id, name=name)


def _resolve_tokenizer_file(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        candidate = path / "tokenizer.json"
        if candidate.is_file():
            return candidate
        hint = ""
        if (path / "tokenizer.model").is_file():
            hint = (
                " It holds a sentencepiece tokenizer.model: convert it once with "
                "`transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(folder)`, "
                "which writes tokenizer.json."
            )
        raise ConfigError(f"--data.tokenizer {path}: the folder holds no tokenizer.json.{hint}")
    raise ConfigError(
        f"--data.tokenizer {path}: no such file or folder. Pass a tokenizer.json file or a folder "
        "holding one, or leave --data.tokenizer empty for the embedded tokenizer."
    )


def _declared_special_tokens(folder: Path) -> dict[str, str]:
    """bos/eos named next to the tokenizer: ``tokenizer_config.json`` first, then
    ``special_tokens_map.json`` (the files transformers writes)."""
    declared: dict[str, str] = {}
    for file_name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later one wins
        config_file = folder / file_name
        if not config_file.is_file():
            continue
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for key in ("bos_token", "eos_token"):
            value = config.get(key) if isinstance(config, dict) else None
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and value:
                declared[key] = value
    return declared


def _special_ids(backend: tokenizers.Tokenizer, *, declared: dict[str, str], where: str,
                 required: dict[str, str] | None = None) -> tuple[int, int]:
    for key, token in (required or {}).items():
        if backend.token_to_id(token) is None:
            option = "--data." + key
            raise ConfigError(
                f"{option} {token!r}: tokenizer {where} has no such token; name a token it has "
                f"(its special tokens: {_special_tokens(backend) or 'none'})"
            )

    def find(key: str, names: tuple[str, ...]) -> int | None:
        for name in (declared.get(key), *names):
            if name is not None and (token_id := backend.token_to_id(name)) is not None:
                return token_id
        return None

    eos_id = find("eos_token", EOS_NAMES)
    if eos_id is None:
        raise ConfigError(
            f"tokenizer {where} has no end-of-text token (looked for {', '.join(EOS_NAMES)}; "
            f"its special tokens are {_special_tokens(backend) or 'none'}). Name the one to use with "
            "--data.eos_token TOKEN (or as eos_token in a tokenizer_config.json next to the tokenizer.json)."
        )
    bos_id = find("bos_token", BOS_NAMES)
    # Tokenizers without a begin-of-text token separate documents by eos alone.
    return (eos_id if bos_id is None else bos_id), eos_id


def _special_tokens(backend: tokenizers.Tokenizer) -> list[str]:
    return [token.content for token in backend.get_added_tokens_decoder().values() if token.special]
