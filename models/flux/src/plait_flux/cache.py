"""The preprocessing cache: every sample's latents and text embeddings, encoded once.

A cache folder holds ``flux-cache.json`` (what was encoded, by which encoders, the sizes,
the augmentation seed, the shards) and ``shard-NNNNN.safetensors`` files of
``shard_size`` samples (``latents`` ``[n, L_img, 4C]``, ``t5`` ``[n, tokens, context]``,
``clip`` ``[n, vec]``), plus ``empty.safetensors`` with the empty caption's embeddings
for prompt dropout. Training with ``--data.dataset`` on the folder reads these and loads
no encoder; the manifest is written last, so a folder without it is not a cache.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from plait.errors import ConfigError
from plait_flux.encoders import EncodedSample, Encoders, encode

MANIFEST = "flux-cache.json"
FORMAT = "plait-flux-cache"
VERSION = 1


def is_cache(path: str) -> bool:
    return bool(path) and (Path(path) / MANIFEST).is_file()


def write_cache(output: str | Path, dataset: Any, encoders: Encoders, *, image_size: int, caption_tokens: int,
                seed: int, shard_size: int, crop: str = "center",
                progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Encode every sample of ``dataset`` (``(image, caption)`` pairs) into ``output``; returns the manifest."""
    from safetensors.torch import save_file

    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[str] = []
    rows: list[EncodedSample] = []
    first: EncodedSample | None = None

    def flush() -> None:
        name = f"shard-{len(shards):05d}.safetensors"
        save_file({field: torch.stack([getattr(row, field) for row in rows]).contiguous()
                   for field in ("latents", "t5", "clip")}, folder / name)
        shards.append(name)
        rows.clear()

    for index in range(len(dataset)):
        image, caption = dataset[index]
        rows.append(encode(encoders, image, caption))
        first = first or rows[0]
        if len(rows) == shard_size:
            flush()
        if progress is not None:
            progress(index + 1, len(dataset))
    if rows:
        flush()
    t5, clip = encoders.encode_text("")
    save_file({"t5": t5.contiguous(), "clip": clip.contiguous()}, folder / "empty.safetensors")
    assert first is not None, "a dataset has samples"
    manifest = {
        "format": FORMAT, "version": VERSION, "samples": len(dataset), "shard_size": shard_size, "shards": shards,
        "source": dataset.identity, "encoders": encoders.identity, "augmentation_seed": seed,
        "crop": crop, "image_size": image_size, "caption_tokens": caption_tokens,
        "latent_shape": list(first.latents.shape), "t5_shape": list(first.t5.shape), "clip_dim": first.clip.shape[0],
    }  # fmt: skip
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


class CachedSamples:
    """The encoded samples of a cache folder, by index (one shard in memory at a time)."""

    def __init__(self, path: str) -> None:
        self.folder = Path(path)
        try:
            manifest = json.loads((self.folder / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ConfigError(f"cannot read the flux cache manifest {self.folder / MANIFEST}: {error}; "
                              "run plait preprocess again") from None
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise ConfigError(f"{self.folder} is a {manifest.get('format')} cache of version "
                              f"{manifest.get('version')}; this plait reads {FORMAT} version {VERSION}: "
                              "run plait preprocess again")
        absent = [name for name in [*manifest["shards"], "empty.safetensors"] if not (self.folder / name).is_file()]
        if absent:
            raise ConfigError(f"the flux cache {self.folder} lacks {', '.join(absent)}: run plait preprocess again")
        self.manifest = manifest
        self.identity = f"flux-cache({manifest['source']}, {manifest['encoders']})"
        self._shard: tuple[int, dict[str, torch.Tensor]] | None = None
        from safetensors.torch import load_file

        empty = load_file(self.folder / "empty.safetensors")
        self.empty_caption = (empty["t5"], empty["clip"])

    def __len__(self) -> int:
        return self.manifest["samples"]

    def __getitem__(self, index: int) -> EncodedSample:
        from safetensors.torch import load_file

        number, row = divmod(index, self.manifest["shard_size"])
        if self._shard is None or self._shard[0] != number:
            self._shard = (number, load_file(self.folder / self.manifest["shards"][number]))
        tensors = self._shard[1]
        return EncodedSample(latents=tensors["latents"][row], t5=tensors["t5"][row], clip=tensors["clip"][row])
