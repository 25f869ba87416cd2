"""The embedded default data: real text that needs no network, and a tokenizer trained on it.

The corpus is the source code of the Python standard library this interpreter ships
(its top-level ``*.py`` files in a fixed shuffled order, one document each). The tokenizer is a
byte-level BPE with exactly ``EMBEDDED_VOCAB_SIZE`` tokens trained on that corpus; the
training is deterministic, and the result is cached per Python version and corpus hash
in ``plait_cache_dir()``, written atomically so that ranks starting together are safe.
"""
from __future__ import annotations

import functools
import hashlib
import os
import random
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from plait.data.tokenizer import Tokenizer, tokenizer_from_json
from plait.errors import PlaitError

EMBEDDED_VOCAB_SIZE = 2048
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
#: Bump when the training recipe below changes, so that stale caches are not reused.
_RECIPE_VERSION = "bpe-bytelevel-1"
_SHUFFLE_SEED = 20261123


def plait_cache_dir() -> Path:
    """``$PLAIT_CACHE_DIR``, or ``~/.cache/plait``."""
    configured = os.environ.get("PLAIT_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "plait"


@dataclass(frozen=True, slots=True)
class EmbeddedCorpus:
    names: tuple[str, ...]
    documents: tuple[str, ...]
    fingerprint: str
    """sha256 of the file names and contents."""


@functools.cache
def embedded_corpus() -> EmbeddedCorpus:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"), key=lambda path: path.name)
    # A fixed shuffle: in name order, neighbouring files share style, and a short run's
    # loss would follow the files rather than the learning.
    random.Random(_SHUFFLE_SEED).shuffle(files)
    if not files:
        raise PlaitError(
            f"the embedded corpus reads the Python standard library sources, but {stdlib} holds no "
            "*.py files (a stripped Python install?). Pass your own text with --data.dataset "
            "(a .jsonl/.parquet/.txt file or folder)."
        )
    digest = hashlib.sha256()
    documents = []
    for file in files:
        raw = file.read_bytes()
        digest.update(file.name.encode() + b"\0" + len(raw).to_bytes(8, "little") + raw)
        documents.append(raw.decode("utf-8", errors="replace"))
    return EmbeddedCorpus(
        names=tuple(file.name for file in files), documents=tuple(documents), fingerprint=digest.hexdigest()
    )


def train_embedded_tokenizer(documents: tuple[str, ...] | list[str]) -> str:
    """Train the byte-level BPE on ``documents``; returns its tokenizer.json text.

    The trainer breaks ties between equally frequent pairs by token id, so the result
    does not depend on thread scheduling (a test builds it twice and compares bytes).
    """
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=EMBEDDED_VOCAB_SIZE,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(documents, trainer=trainer)
    if backend.get_vocab_size(with_added_tokens=True) != EMBEDDED_VOCAB_SIZE:
        raise PlaitError(
            f"the embedded tokenizer came out with {backend.get_vocab_size()} tokens instead of "
            f"{EMBEDDED_VOCAB_SIZE}: the standard library corpus is too small. "
            "Pass a tokenizer with --data.tokenizer."
        )
    return backend.to_str()


def embedded_tokenizer_path() -> Path:
    """Where the embedded tokenizer is cached for this Python and this corpus."""
    corpus = embedded_corpus()
    key = hashlib.sha256(
        "\0".join(
            (_RECIPE_VERSION, str(EMBEDDED_VOCAB_SIZE), tokenizers.__version__, corpus.fingerprint)
        ).encode()
    ).hexdigest()[:16]
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return plait_cache_dir() / "tokenizers" / f"embedded-{python}-{key}.json"


def embedded_tokenizer() -> Tokenizer:
    """The embedded tokenizer, from the cache or trained now (about a second)."""
    path = embedded_tokenizer_path()
    text = _read_cached(path)
    if text is None:
        text = train_embedded_tokenizer(embedded_corpus().documents)
        _write_atomically(path, text)
    return tokenizer_from_json(text, name=f"embedded BPE-{EMBEDDED_VOCAB_SIZE} ({path.name})")


def _read_cached(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
        tokenizers.Tokenizer.from_str(text)  # a damaged cache entry is rebuilt, not trusted
    except Exception:
        return None
    return text


def _write_atomically(path: Path, text: str) -> None:
    """Write via a temporary file and rename: readers see the whole file or none.
    A cache that cannot be written (read-only home) is skipped silently."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except OSError:
        Path(temporary).unlink(missing_ok=True)
