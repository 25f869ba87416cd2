"""Image–caption pairs on disk: a folder of images, each captioned by a ``<stem>.txt``
beside it or by a ``metadata.jsonl`` (lines ``{"file_name": ..., "text": ...}``, the
layout of Hugging Face's image folders). Images are resized (shorter side to the image
size), centre-cropped to a square and scaled to [-1, 1]; nothing random, so the
preprocessing cache holds exactly what the online pipeline computes.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from plait.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA = "metadata.jsonl"


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


class ImageFolder:
    """The images under ``root`` (sorted by path) and their captions."""

    def __init__(self, root: str, *, image_size: int) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"--data.dataset {root} is not a folder: give a folder of images with captions "
                              f"(<name>.txt beside each image, or a {METADATA}), or a plait preprocess cache")
        self.image_size = image_size
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ConfigError(f"--data.dataset {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        by_name = _captions_from_metadata(self.root) if (self.root / METADATA).is_file() else {}
        self.captions = []
        for path in self.files:
            relative = path.relative_to(self.root).as_posix()
            if relative in by_name:
                self.captions.append(by_name[relative])
            elif path.with_suffix(".txt").is_file():
                self.captions.append(path.with_suffix(".txt").read_text(encoding="utf-8").strip())
            else:
                raise ConfigError(f"{path} has no caption: add {path.with_suffix('.txt').name} beside it or a "
                                  f"line for {relative!r} in {self.root / METADATA}")
        self.identity = f"image-folder({self.root.resolve()}, {len(self.files)} images, image_size={image_size})"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        from PIL import Image

        with Image.open(self.files[index]) as opened:
            image = opened.convert("RGB")
        side = self.image_size
        scale = side / min(image.size)
        width, height = max(side, round(image.width * scale)), max(side, round(image.height * scale))
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(side, side, 3)
        return pixels.permute(2, 0, 1).float() / 127.5 - 1, self.captions[index]
