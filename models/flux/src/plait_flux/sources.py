"""Image–caption pairs on disk, in four layouts ``--data.dataset`` may name:

- a folder of images, each captioned by a ``<stem>.txt`` beside it or by a
  ``metadata.jsonl`` (lines ``{"file_name": ..., "text": ...}``, the layout of Hugging
  Face's image folders);
- webdataset shards: a ``.tar`` file, or a folder of them, whose members group by key
  (``0001.png`` with ``0001.txt``, or ``0001.json`` holding ``"text"`` or ``"caption"``);
- parquet shards: a ``.parquet`` file, or a folder of them, with an image column (encoded
  bytes, or a ``{"bytes": ...}`` struct as Hugging Face datasets write it) and a text
  column;
- a Hugging Face dataset saved on disk (``Dataset.save_to_disk``; a ``DatasetDict``'s
  ``train`` split), read through ``datasets``, with an image and a text column.

The image column is the first of ``image``, ``jpg``, ``png``, ``webp`` found, the text
column the first of ``text``, ``caption``, ``txt``. Images are resized (shorter side to
the image size) and cropped to a square, at the centre or (``--flux.crop random``) at a
position drawn from (the augmentation seed, the sample's index): a sample's crop is the
same every epoch, so the preprocessing cache (which records the seed) holds exactly what
the online pipeline computes. Pixels are scaled to [-1, 1].
"""
from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from plait.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA = "metadata.jsonl"
IMAGE_COLUMNS = ("image", "jpg", "png", "webp")
TEXT_COLUMNS = ("text", "caption", "txt")


def square_pixels(image: Any, side: int, *, crop: str, generator: torch.Generator | None) -> torch.Tensor:
    """A PIL image resized (shorter side to ``side``), cropped to ``side × side`` (centre, or
    where ``generator`` draws) and scaled to [-1, 1]: ``float [3, side, side]``."""
    from PIL import Image

    image = image.convert("RGB")
    scale = side / min(image.size)
    width, height = max(side, round(image.width * scale)), max(side, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    if crop == "random":
        assert generator is not None
        left = int(torch.randint(width - side + 1, (), generator=generator))
        top = int(torch.randint(height - side + 1, (), generator=generator))
    else:
        left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(side, side, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1


class PairSource:
    """Pairs ``(pixels, caption)`` by index; a layout gives ``len(self.captions)`` images
    through ``open_image(index)`` (a PIL image)."""

    kind = "pairs"

    def __init__(self, location: str, captions: list[str], *, image_size: int, crop: str, seed: int) -> None:
        self.captions, self.image_size, self.crop, self.seed = captions, image_size, crop, seed
        augmentation = f"crop={crop}" + (f", augmentation_seed={seed}" if crop == "random" else "")
        self.identity = f"{self.kind}({location}, {len(captions)} images, image_size={image_size}, {augmentation})"

    def open_image(self, index: int) -> Any:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index) if self.crop == "random" else None
        with self.open_image(index) as image:
            pixels = square_pixels(image, self.image_size, crop=self.crop, generator=generator)
        return pixels, self.captions[index]


def _image_from_bytes(data: bytes) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(data))


# ----------------------------------------------------------------------------- image folder


def _captions_from_metadata(root: Path) -> dict[str, str]:
    captions = {}
    for number, line in enumerate((root / METADATA).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            captions[record["file_name"]] = str(record["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"{root / METADATA} line {number} is not a JSON object with \"file_name\" and "
                              f"\"text\": {line[:80]!r}") from None
    return captions


class ImageFolder(PairSource):
    """The images under ``root`` (sorted by path) and their captions."""

    kind = "image-folder"

    def __init__(self, root: str, *, image_size: int, crop: str = "center", seed: int = 0) -> None:
        self.root = Path(root)
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ConfigError(f"--data.dataset {root} holds no images ({', '.join(IMAGE_SUFFIXES)}), webdataset "
                              "(.tar) or parquet shards, or Hugging Face dataset saved on disk")
        by_name = _captions_from_metadata(self.root) if (self.root / METADATA).is_file() else {}
        captions = []
        for path in self.files:
            relative = path.relative_to(self.root).as_posix()
            if relative in by_name:
                captions.append(by_name[relative])
            elif path.with_suffix(".txt").is_file():
                captions.append(path.with_suffix(".txt").read_text(encoding="utf-8").strip())
            else:
                raise ConfigError(f"{path} has no caption: add {path.with_suffix('.txt').name} beside it or a "
                                  f"line for {relative!r} in {self.root / METADATA}")
        super().__init__(str(self.root.resolve()), captions, image_size=image_size, crop=crop, seed=seed)

    def open_image(self, index: int) -> Any:
        from PIL import Image

        return Image.open(self.files[index])


# ----------------------------------------------------------------------------- webdataset


def _shards(path: Path, suffix: str) -> list[Path]:
    return [path] if path.is_file() else sorted(path.glob(f"*{suffix}"))


def _caption_of(name: str, data: bytes) -> str:
    if name.endswith(".json"):
        record = json.loads(data)
        for column in TEXT_COLUMNS:
            if column in record:
                return str(record[column])
        raise ConfigError(f"{name} has none of the caption keys {', '.join(TEXT_COLUMNS)}")
    return data.decode("utf-8").strip()


class TarShards(PairSource):
    """webdataset shards: every key with an image member and a caption member, shard by shard."""

    kind = "webdataset"

    def __init__(self, path: str, *, image_size: int, crop: str = "center", seed: int = 0) -> None:
        self.shards = _shards(Path(path), ".tar")
        self.members: list[tuple[Path, str]] = []
        captions = []
        for shard in self.shards:
            try:
                with tarfile.open(shard) as tar:
                    by_key: dict[str, dict[str, tarfile.TarInfo]] = {}
                    for member in tar.getmembers():
                        if member.isfile():
                            directory, _, base = member.name.rpartition("/")
                            key, _, extension = base.partition(".")
                            by_key.setdefault(f"{directory}/{key}", {})[f".{extension.lower()}"] = member
                    for key, files in by_key.items():
                        image = next((files[s] for s in IMAGE_SUFFIXES if s in files), None)
                        text = files.get(".txt") or files.get(".json")
                        if image is None or text is None:
                            raise ConfigError(f"{shard}: sample {key.lstrip('/')!r} lacks "
                                              + ("an image" if image is None else "a caption (.txt or .json)")
                                              + f"; each key needs one of {', '.join(IMAGE_SUFFIXES)} and a caption")
                        self.members.append((shard, image.name))
                        captions.append(_caption_of(text.name, tar.extractfile(text).read()))
            except tarfile.TarError as error:
                raise ConfigError(f"--data.dataset: {shard} is not a readable tar file ({error})") from None
        self._open: dict[Path, tarfile.TarFile] = {}
        super().__init__(str(Path(path).resolve()), captions, image_size=image_size, crop=crop, seed=seed)

    def open_image(self, index: int) -> Any:
        shard, name = self.members[index]
        if shard not in self._open:
            self._open[shard] = tarfile.open(shard)
        return _image_from_bytes(self._open[shard].extractfile(name).read())


# ----------------------------------------------------------------------------- columns


def _columns(names: list[str], where: str) -> tuple[str, str]:
    image = next((c for c in IMAGE_COLUMNS if c in names), None)
    text = next((c for c in TEXT_COLUMNS if c in names), None)
    if image is None or text is None:
        raise ConfigError(f"{where} has the columns {', '.join(names)}; flux reads an image column "
                          f"({' or '.join(IMAGE_COLUMNS)}) and a caption column ({' or '.join(TEXT_COLUMNS)})")
    return image, text


def _image_bytes(value: Any) -> bytes:
    return value["bytes"] if isinstance(value, dict) else value


class ParquetShards(PairSource):
    """parquet shards, read one row group at a time."""

    kind = "parquet"

    def __init__(self, path: str, *, image_size: int, crop: str = "center", seed: int = 0) -> None:
        import pyarrow.parquet as pq

        self.files = [pq.ParquetFile(shard) for shard in _shards(Path(path), ".parquet")]
        self.image_column, text_column = _columns(self.files[0].schema_arrow.names, str(path))
        self.rows: list[tuple[int, int, int]] = []  # (file, row group, row in group)
        captions = []
        for number, file in enumerate(self.files):
            for group in range(file.num_row_groups):
                texts = file.read_row_group(group, columns=[text_column]).column(0).to_pylist()
                captions.extend(str(text) for text in texts)
                self.rows.extend((number, group, row) for row in range(len(texts)))
        self._group: tuple[tuple[int, int], list[Any]] | None = None
        super().__init__(str(Path(path).resolve()), captions, image_size=image_size, crop=crop, seed=seed)

    def open_image(self, index: int) -> Any:
        number, group, row = self.rows[index]
        if self._group is None or self._group[0] != (number, group):
            column = self.files[number].read_row_group(group, columns=[self.image_column]).column(0)
            self._group = ((number, group), column.to_pylist())
        return _image_from_bytes(_image_bytes(self._group[1][row]))


class SavedHFDataset(PairSource):
    """A Hugging Face dataset saved with ``save_to_disk`` (a ``DatasetDict``: its ``train`` split)."""

    kind = "hf-dataset"

    def __init__(self, path: str, *, image_size: int, crop: str = "center", seed: int = 0) -> None:
        try:
            import datasets
        except ImportError:
            raise ConfigError(f"--data.dataset {path} is a Hugging Face dataset saved on disk: reading it needs the "
                              "datasets package (pip install datasets)") from None
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise ConfigError(f"--data.dataset {path} holds the splits {', '.join(loaded)}; flux reads 'train'")
            loaded = loaded["train"]
        self.image_column, text_column = _columns(loaded.column_names, path)
        self.dataset = loaded
        super().__init__(str(Path(path).resolve()), [str(t) for t in loaded[text_column]], image_size=image_size,
                         crop=crop, seed=seed)

    def open_image(self, index: int) -> Any:
        value = self.dataset[index][self.image_column]
        return value if hasattr(value, "convert") else _image_from_bytes(_image_bytes(value))


def _is_saved_hf_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def pair_source(dataset: str, *, image_size: int, crop: str, seed: int) -> PairSource:
    """The layout ``--data.dataset`` names (see the module docstring)."""
    path = Path(dataset)
    if not path.exists():
        raise ConfigError(f"--data.dataset {dataset} does not exist: give a folder of images with captions, "
                          "webdataset (.tar) or parquet shards, a Hugging Face dataset saved on disk, or a "
                          "plait preprocess cache")
    layouts: list[tuple[bool, Callable[..., PairSource]]] = [
        (path.suffix == ".tar" or (path.is_dir() and any(path.glob("*.tar"))), TarShards),
        (path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet"))), ParquetShards),
        (path.is_dir() and _is_saved_hf_dataset(path), SavedHFDataset),
        (path.is_dir(), ImageFolder),
    ]
    for matches, layout in layouts:
        if matches:
            return layout(dataset, image_size=image_size, crop=crop, seed=seed)
    raise ConfigError(f"--data.dataset {dataset} is a file flux cannot read: give a .tar or .parquet shard, or a folder")
