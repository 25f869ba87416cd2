"""Where documents come from: the embedded corpus, local files or a Hugging Face dataset.

A source is an ordered sequence of texts that can be reopened at a saved position.
Positions are small JSON values: ``None`` is the start of the data; the embedded corpus
uses ``{"index": i}``; local JSON-lines files, read line by line without the ``datasets``
library, ``{"file": i, "offset": byte}``; Hugging Face datasets (other local files, hub
names, ``--data.streaming False``) use the dataset's own ``state_dict()``. Each resumes
inside a file without reading what comes before it.
"""
from __future__ import annotations

import copy
import glob
import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plait.config import DataSection
from plait.errors import ConfigError, DataError

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger("plait")

Position = Any
"""A JSON value saying where to resume; None is the start of the data."""

#: File suffix -> the Hugging Face datasets builder that reads it.
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


class DocumentReader(ABC):
    """Reads one pass over a source, from the position it was opened at."""

    @abstractmethod
    def position(self) -> Position:
        """Where the next unread document is; opening the source there resumes exactly."""

    @abstractmethod
    def read(self, max_chars: int) -> list[str]:
        """The next documents, about ``max_chars`` characters of them (at least one
        document); an empty list at the end of the data."""

    def skip(self, count: int) -> None:
        for _ in range(count):
            if not self.read(0):
                return


class DocumentSource(ABC):
    identity: str
    """Names the data, so that a saved position is not applied to other data."""

    @abstractmethod
    def open(self, position: Position) -> DocumentReader: ...

    @property
    def skipped_rows(self) -> int:
        """Malformed rows skipped so far (``--data.bad_rows skip``)."""
        return 0


# ------------------------------------------------------------------ embedded corpus


class EmbeddedSource(DocumentSource):
    def __init__(self, documents: tuple[str, ...], *, fingerprint: str) -> None:
        self.documents = documents
        self.identity = f"embedded:{fingerprint[:16]}"

    def open(self, position: Position) -> DocumentReader:
        return _ListReader(self.documents, 0 if position is None else int(position["index"]))


class _ListReader(DocumentReader):
    def __init__(self, documents: tuple[str, ...], start: int) -> None:
        self._documents = documents
        self._next = start

    def position(self) -> Position:
        return {"index": self._next}

    def read(self, max_chars: int) -> list[str]:
        texts: list[str] = []
        chars = 0
        while self._next < len(self._documents) and (not texts or chars < max_chars):
            texts.append(self._documents[self._next])
            chars += len(texts[-1])
            self._next += 1
        return texts

    def skip(self, count: int) -> None:
        self._next = min(self._next + count, len(self._documents))


# ------------------------------------------------------------------ local JSON lines

#: How much of a JSON-lines file is parsed before training starts, so that a malformed
#: file is a ConfigError at once (Hugging Face's reader parses its first block too).
_CHECKED_BYTES = 1 << 16
#: Skipped rows named one by one in the log; later ones are only counted.
_NAMED_SKIPS = 10


class JsonLinesSource(DocumentSource):
    """Local ``.jsonl`` files, one JSON object per line, read line by line. Importing
    ``datasets`` for them would cost about a second and 100 MB at start-up."""

    def __init__(self, files: list[Path], *, data: DataSection, identity: str) -> None:
        self.files = files
        self.data = data
        self.identity = identity
        self._skipped = 0

    def open(self, position: Position) -> _JsonLinesReader:
        return _JsonLinesReader(self, start=position)

    @property
    def skipped_rows(self) -> int:
        return self._skipped

    def check(self) -> None:
        """The first row must hold the text field as text; the first lines must parse
        (a malformed one is a ConfigError now, or skipped with --data.bad_rows skip)."""
        reader = self.open(None)
        reader.checking = True
        rows = reader.rows()
        first = next(rows, None)
        if first is None:
            raise ConfigError(f"--data.dataset {self.data.dataset!r} (split {self.data.split!r}) holds no rows.")
        _check_first_row(first, self.data)
        for _ in rows:
            if reader.bytes_read >= _CHECKED_BYTES:
                break
        rows.close()
        self._skipped = 0  # counted again when training reads them

    def bad_row(self, file: Path, at: int, problem: str, *, checking: bool) -> None:
        """A row that cannot be trained on: skipped and counted (``--data.bad_rows skip``),
        or an error naming the file and line (a ``ConfigError`` before training starts)."""
        if self.data.bad_rows == "skip":
            self._skipped += 1
            if self._skipped <= _NAMED_SKIPS:
                logger.warning("skipping line %d of %s: %s (--data.bad_rows skip)%s", _line_number(file, at), file,
                               problem, "; further bad rows are only counted" if self._skipped == _NAMED_SKIPS else "")
            return
        message = (f"line {_line_number(file, at)} of {file} (byte {at}) {problem}. Fix or delete that line, "
                   "or pass --data.bad_rows skip to skip such rows (they are counted in data/bad_rows_skipped)")
        if checking:
            raise _unreadable(self.data, ValueError(message))
        raise DataError(message)


def _line_number(file: Path, offset: int) -> int:
    """The 1-based line at byte ``offset`` of ``file`` (counted only when reported)."""
    lines, done = 1, 0
    with open(file, "rb") as handle:
        while done < offset:
            block = handle.read(min(1 << 20, offset - done))
            if not block:
                break
            lines += block.count(b"\n")
            done += len(block)
    return lines


class _JsonLinesReader(DocumentReader):
    def __init__(self, source: JsonLinesSource, *, start: Position) -> None:
        self._source = source
        self._start = start
        self._started = False
        self._file = 0 if start is None else int(start["file"])
        self._offset = 0 if start is None else int(start["offset"])
        self.bytes_read = 0
        self.rows_taken = 0
        self.checking = False
        """Reading before training starts: a bad row is a ConfigError, and the first row's
        fields are checked by the caller (which lists them)."""

    def position(self) -> Position:
        return {"file": self._file, "offset": self._offset} if self._started else self._start

    def read(self, max_chars: int) -> list[str]:
        field, label = self._source.data.text_field, f"dataset {self._source.data.dataset!r}"
        texts: list[str] = []
        chars = 0
        rows = self.rows()
        for row in rows:
            text = row[field]
            if text is None:
                text = ""
            elif not isinstance(text, str):
                raise _not_text(field, label, text)
            texts.append(text)
            chars += len(text)
            if chars >= max_chars:
                break
        rows.close()  # closes the file; the position stays after the last row taken
        return texts

    def rows(self) -> Iterator[dict[str, Any]]:
        """The JSON objects that hold the text field, from the position on, skipping blank
        lines (and bad rows with --data.bad_rows skip); the position moves past each row as
        it is taken."""
        self._started = True
        files = self._source.files
        while self._file < len(files):
            with open(files[self._file], "rb") as handle:
                handle.seek(self._offset)
                for line in iter(handle.readline, b""):
                    at = self._offset
                    self._offset += len(line)
                    self.bytes_read += len(line)
                    if line.strip():
                        row = self._parse(line, files[self._file], at)
                        if row is not None:
                            self.rows_taken += 1
                            yield row
            self._file, self._offset = self._file + 1, 0

    def _parse(self, line: bytes, file: Path, at: int) -> dict[str, Any] | None:
        """The row of ``line``, or None for a bad row that is skipped."""
        try:
            row = json.loads(line)
        except ValueError as error:  # also bad UTF-8
            problem = f"is not valid JSON ({error})"
        else:
            field = self._source.data.text_field
            if not isinstance(row, dict):
                problem = f"holds a JSON {type(row).__name__}; JSON lines need one object per line"
            elif field not in row and not (self.checking and self.rows_taken == 0):
                problem = (f"has no field {field!r} (--data.text_field; its fields: "
                           f"{', '.join(map(str, list(row)[:8])) or 'none'})")
            else:
                return row
        self._source.bad_row(file, at, problem, checking=self.checking)
        return None


def _is_json_lines(files: list[Path], data: DataSection) -> bool:
    """Uncompressed ``.jsonl`` files streamed whole: what ``JsonLinesSource`` reads."""
    return data.streaming and "[" not in data.split and all(f.name.lower().endswith(".jsonl") for f in files)


# --------------------------------------------------------------- Hugging Face datasets


class HFSource(DocumentSource):
    """A Hugging Face dataset (local files or a hub name), streamed or memory-mapped."""

    def __init__(self, dataset: datasets.IterableDataset, *, text_field: str, identity: str, label: str) -> None:
        self._dataset = dataset.select_columns([text_field])
        self.text_field = text_field
        self.identity = identity
        self.label = label

    def open(self, position: Position) -> DocumentReader:
        # A private copy: the dataset object keeps its iteration state in itself.
        dataset = copy.deepcopy(self._dataset)
        if position is not None:
            dataset.load_state_dict(position)
        return _HFReader(dataset, start=position, source=self)


class _HFReader(DocumentReader):
    def __init__(self, dataset: datasets.IterableDataset, *, start: Position, source: HFSource) -> None:
        self._dataset = dataset
        self._rows: Iterator[dict[str, Any]] = iter(dataset)
        self._start = start
        self._started = False
        self._source = source

    def position(self) -> Position:
        # Before the first row is pulled the dataset has no live state yet.
        return self._dataset.state_dict() if self._started else self._start

    def read(self, max_chars: int) -> list[str]:
        texts: list[str] = []
        chars = 0
        while not texts or chars < max_chars:
            row = next(self._rows, None)
            self._started = True
            if row is None:
                break
            text = row[self._source.text_field]
            if text is None:
                text = ""
            elif not isinstance(text, str):
                raise _not_text(self._source.text_field, self._source.label, text)
            texts.append(text)
            chars += len(text)
        return texts


# ------------------------------------------------------------------ held-out share


class HeldOutSplit(DocumentSource):
    """The documents of ``source`` on one side of a deterministic split: a document is
    held out when a hash of its text falls in the first ``share`` of the hash range, so
    the split does not depend on order, position or layout, and training and validation
    never share a document (equal texts fall on the same side)."""

    def __init__(self, source: DocumentSource, *, share: float, held_out: bool) -> None:
        self.source = source
        self.share = share
        self.held_out = held_out
        side = "held-out" if held_out else "training"
        self.identity = f"{source.identity}:{side} share {share!r}"

    @property
    def skipped_rows(self) -> int:
        return self.source.skipped_rows

    def keeps(self, text: str) -> bool:
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return (int.from_bytes(digest, "little") / 2**64 < self.share) == self.held_out

    def open(self, position: Position) -> DocumentReader:
        return _SplitReader(self, self.source.open(position))


class _SplitReader(DocumentReader):
    def __init__(self, split: HeldOutSplit, reader: DocumentReader) -> None:
        self._split = split
        self._reader = reader

    def position(self) -> Position:
        return self._reader.position()

    def read(self, max_chars: int) -> list[str]:
        kept: list[str] = []
        while not kept:
            texts = self._reader.read(max_chars)
            if not texts:
                return []
            kept = [text for text in texts if self._split.keeps(text)]
        return kept

    def shares(self) -> dict[str, float]:
        return self._reader.shares() if hasattr(self._reader, "shares") else {}


# ------------------------------------------------------------------ mixtures


class MixtureSource(DocumentSource):
    """Documents of several sources interleaved by weight, one document at a time, before
    packing (so long documents of one source do not skew the ratios). The order is a
    deterministic weighted round robin: the next document comes from the source whose
    count of documents taken, plus one, divided by its weight is smallest (ties: the first
    listed). Each source starts again from its beginning when it runs out (its own epochs).
    The position holds every source's position, epoch and count, so a resumed run sees the
    same documents."""

    def __init__(self, sources: list[DocumentSource], *, weights: list[float], labels: list[str]) -> None:
        self.sources = sources
        self.weights = weights
        self.labels = labels
        self.identity = "mixture:[" + ", ".join(f"{s.identity}@{w!r}" for s, w in zip(sources, weights)) + "]"

    @property
    def skipped_rows(self) -> int:
        return sum(source.skipped_rows for source in self.sources)

    def open(self, position: Position) -> DocumentReader:
        return _MixtureReader(self, position)


class _MixtureReader(DocumentReader):
    def __init__(self, mixture: MixtureSource, start: Position) -> None:
        count = len(mixture.sources)
        self._mixture = mixture
        self._counts: list[int] = [0] * count if start is None else [int(c) for c in start["counts"]]
        self._epochs: list[int] = [0] * count if start is None else [int(e) for e in start["epochs"]]
        parts = [None] * count if start is None else start["parts"]
        self._readers = [source.open(part) for source, part in zip(mixture.sources, parts)]

    def position(self) -> Position:
        return {"parts": [reader.position() for reader in self._readers], "epochs": list(self._epochs),
                "counts": list(self._counts)}

    def read(self, max_chars: int) -> list[str]:
        texts: list[str] = []
        chars = 0
        while not texts or chars < max_chars:
            index = min(range(len(self._readers)), key=lambda i: (self._counts[i] + 1) / self._mixture.weights[i])
            text = self._next_document(index)
            self._counts[index] += 1
            texts.append(text)
            chars += len(text)
        return texts

    def _next_document(self, index: int) -> str:
        documents = self._readers[index].read(0)
        if not documents:  # this source's epoch ends; the mixture goes on
            self._epochs[index] += 1
            self._readers[index] = self._mixture.sources[index].open(None)
            documents = self._readers[index].read(0)
            if not documents:
                raise ConfigError(f"--data.mixture: {self._mixture.labels[index]} holds no documents")
        return documents[0]

    def shares(self) -> dict[str, float]:
        """The share of documents each source gave so far."""
        total = sum(self._counts) or 1
        return {label: count / total for label, count in zip(self._mixture.labels, self._counts)}


def parse_mixture_entry(entry: str) -> tuple[str, float, str | None]:
    """``DATASET[@WEIGHT][#TEXT_FIELD]`` -> (dataset, weight, text field or None)."""
    rest, field = (entry.rsplit("#", 1) + [None])[:2] if "#" in entry else (entry, None)
    dataset, weight = rest, 1.0
    if "@" in rest:
        dataset, _, weight_text = rest.rpartition("@")
        try:
            weight = float(weight_text)
        except ValueError:
            raise ConfigError(f"--data.mixture {entry!r}: the weight after @ must be a number, got {weight_text!r}") from None
    if not dataset.strip():
        raise ConfigError(f"--data.mixture {entry!r}: name a dataset before @WEIGHT, e.g. ./web.jsonl@0.7")
    if not (weight > 0 and weight < float("inf")):
        raise ConfigError(f"--data.mixture {entry!r}: the weight must be positive, got {weight}")
    return dataset.strip(), weight, field or None


def _build_mixture(data: DataSection) -> MixtureSource:
    import dataclasses

    sources, weights, labels = [], [], []
    for entry in data.mixture:
        dataset, weight, field = parse_mixture_entry(entry)
        part = dataclasses.replace(data, dataset=dataset, text_field=field or data.text_field, mixture=(),
                                   held_out_share=0.0)
        sources.append(_build_whole_source(part))
        weights.append(weight)
        labels.append(dataset)
    total = sum(weights)
    return MixtureSource(sources, weights=[w / total for w in weights], labels=labels)


def build_source(data: DataSection, *, held_out: bool = False) -> DocumentSource:
    """The source ``data`` names; every user mistake is a ConfigError raised here,
    before training starts. With ``data.held_out_share`` > 0 it is the training side of
    the split, or the held-out side with ``held_out``."""
    source = _build_mixture(data) if data.mixture else _build_whole_source(data)
    if data.held_out_share > 0:
        source = HeldOutSplit(source, share=data.held_out_share, held_out=held_out)
    return source


def _build_whole_source(data: DataSection) -> DocumentSource:
    if not data.dataset:
        from plait.data.embedded import embedded_corpus

        corpus = embedded_corpus()
        return EmbeddedSource(corpus.documents, fingerprint=corpus.fingerprint)

    files = _local_files(data.dataset)
    if files is not None and _is_json_lines(files, data):
        source = JsonLinesSource(files, data=data, identity=f"jsonl:{len(files)} files:{_names_hash(files)}:"
                                                          f"{data.split}:{data.text_field}:lines")
        source.check()
        return source

    import datasets

    datasets.disable_progress_bars()
    if files is not None:
        builder = _builder_for(files, data.dataset)
        base_split = data.split.split("[")[0] or "train"
        dataset = _load(
            data,
            lambda: datasets.load_dataset(
                builder, data_files={base_split: [str(f) for f in files]}, split=data.split, streaming=data.streaming
            ),
            missing_hint="",
        )
        identity = f"{builder}:{len(files)} files:{_names_hash(files)}"
    else:
        dataset = _load(
            data,
            lambda: datasets.load_dataset(
                data.dataset, data.dataset_config or None, split=data.split, streaming=data.streaming
            ),
            missing_hint=(
                f"--data.dataset {data.dataset!r} is not a local file or folder, and the Hugging Face "
                "dataset of that name could not be found locally or downloaded"
            ),
        )
        identity = f"hf:{data.dataset}:{data.dataset_config}"
    if not data.streaming:
        dataset = dataset.to_iterable_dataset()
    _check_text_field(dataset, data)
    mode = "streaming" if data.streaming else "map"
    identity = f"{identity}:{data.split}:{data.text_field}:{mode}"
    return HFSource(dataset, text_field=data.text_field, identity=identity, label=f"dataset {data.dataset!r}")


def _local_files(spec: str) -> list[Path] | None:
    """The files a local dataset spec names, or None when it is not a local path."""
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    files: list[Path] = []
    for part in parts:
        path = Path(part).expanduser()
        if path.is_dir():
            found = sorted(
                (p for p in path.rglob("*") if p.is_file() and _suffix(p) in BUILDERS and not _hidden(p, path)),
                key=lambda p: p.relative_to(path).as_posix(),
            )
            if not found:
                raise ConfigError(
                    f"--data.dataset: the folder {path} holds no {'/'.join(BUILDERS)} files."
                )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif glob.has_magic(part) and (matches := sorted(glob.glob(str(path), recursive=True))):
            files.extend(Path(m) for m in matches if Path(m).is_file())
        elif _looks_like_path(part) or len(parts) > 1:
            raise ConfigError(
                f"--data.dataset: no such file or folder: {part}. Pass existing "
                f"{'/'.join(BUILDERS)} files (comma separated) or a folder of them."
            )
        else:
            return None  # a Hugging Face dataset name
    return files


def _names_hash(files: list[Path]) -> str:
    """Names relative to their folder, hashed: the same data moved elsewhere still resumes."""
    return hashlib.sha256("\0".join(f.name for f in files).encode()).hexdigest()[:16]


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for compression in _COMPRESSIONS:
        name = name.removesuffix(compression)
    return Path(name).suffix


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or _suffix(Path(spec)) in BUILDERS


def _builder_for(files: list[Path], spec: str) -> str:
    builders = {BUILDERS.get(_suffix(f)) for f in files}
    if None in builders:
        unknown = next(f for f in files if _suffix(f) not in BUILDERS)
        raise ConfigError(
            f"--data.dataset: cannot read {unknown}: the supported files are {', '.join(BUILDERS)} "
            f"(optionally compressed with {', '.join(_COMPRESSIONS)})."
        )
    if len(builders) > 1:
        raise ConfigError(
            f"--data.dataset {spec}: all files must be of one kind, but it mixes "
            f"{', '.join(sorted(b for b in builders if b))} files; to mix kinds, list each as a source "
            "of --data.mixture (e.g. --data.mixture a.jsonl@1 b.txt@1)."
        )
    return builders.pop()  # type: ignore[return-value]


def _load(data: DataSection, load: Callable[[], Any], *, missing_hint: str) -> Any:
    how_to = (
        "Pass a local .jsonl/.json/.parquet/.txt file, a comma-separated list of them or a folder "
        "with --data.dataset, or leave it empty for the embedded corpus."
    )
    try:
        return load()
    except OSError as error:  # no network, no such dataset or file, HTTP errors
        reason = missing_hint or f"--data.dataset {data.dataset!r} could not be read"
        raise ConfigError(f"{reason} ({type(error).__name__}: {error}). {how_to}") from None
    except (ValueError, _datasets_error()) as error:
        raise _unreadable(data, error) from None


def _datasets_error() -> type[Exception]:
    from datasets.exceptions import DatasetsError

    return DatasetsError


def _unreadable(data: DataSection, error: Exception) -> ConfigError:
    cause = f" ({error.__cause__})" if error.__cause__ else ""
    return ConfigError(
        f"--data.dataset {data.dataset!r} (split {data.split!r}) could not be loaded: {error}{cause}"
    )


def _check_text_field(dataset: datasets.IterableDataset, data: DataSection) -> None:
    """The text field must exist and hold strings; looking at the first row also
    catches formats without a schema (JSON lines) and unreadable files early."""
    try:
        first = next(iter(copy.deepcopy(dataset)), None)
    except (ValueError, OSError, _datasets_error()) as error:
        raise _unreadable(data, error) from None
    if first is None:
        raise ConfigError(f"--data.dataset {data.dataset!r} (split {data.split!r}) holds no rows.")
    _check_first_row(first, data)


def _check_first_row(first: dict[str, Any], data: DataSection) -> None:
    if data.text_field not in first:
        raise ConfigError(
            f"--data.text_field: dataset {data.dataset!r} has no column {data.text_field!r}; "
            f"its columns are {', '.join(first)}. Pass one of them with --data.text_field."
        )
    value = first[data.text_field]
    if value is not None and not isinstance(value, str):
        raise _not_text(data.text_field, f"dataset {data.dataset!r}", value)


def _not_text(field: str, label: str, value: Any) -> ConfigError:
    return ConfigError(
        f"--data.text_field {field!r} of {label} holds {type(value).__name__} values, not text. "
        "Point --data.text_field at a string column."
    )
