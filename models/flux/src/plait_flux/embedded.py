"""The embedded default: a dataset and encoders that need no network and no download.

``ShapesDataset`` draws one coloured shape per image, deterministically from its index,
with a caption naming its colour, shape and position ("a red circle at the top left").
``WordEncoder`` stands in for T5 and CLIP: a word-level vocabulary of the captions with
embedding tables drawn from fixed seeds (text tokens, and their mean as the pooled
vector). ``PixelAutoencoder`` stands in for the autoencoder: 2×2 pixel blocks become 12
channels, padded to the 16 latent channels of FLUX, so decoding is exact.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

COLOURS = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.9, 0.1), "purple": (0.6, 0.2, 0.8), "white": (0.95, 0.95, 0.95),
}
SHAPES = ("square", "circle", "triangle")
POSITIONS = {  # name -> centre as a share of the image (row, column)
    "top left": (0.3, 0.3), "top right": (0.3, 0.7), "bottom left": (0.7, 0.3),
    "bottom right": (0.7, 0.7), "centre": (0.5, 0.5),
}
VOCABULARY = ("<pad>", "a", "at", "the", *COLOURS, *SHAPES, "top", "bottom", "left", "right", "centre")


class ShapesDataset:
    """``len`` images of ``image_size``² pixels in [-1, 1] with captions, each a pure
    function of its index."""

    def __init__(self, *, size: int, image_size: int, seed: int = 0) -> None:
        self.size = size
        self.image_size = image_size
        self.seed = seed
        self.identity = f"embedded-shapes(size={size}, image_size={image_size}, seed={seed})"

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        pick = lambda n: int(torch.randint(n, (), generator=generator))  # noqa: E731
        colour = list(COLOURS)[pick(len(COLOURS))]
        shape = SHAPES[pick(len(SHAPES))]
        position = list(POSITIONS)[pick(len(POSITIONS))]
        radius = 0.16 + 0.06 * float(torch.rand((), generator=generator))
        return self.draw(colour, shape, position, radius), f"a {colour} {shape} at the {position}"

    def draw(self, colour: str, shape: str, position: str, radius: float) -> torch.Tensor:
        n = self.image_size
        rows, cols = torch.meshgrid((torch.arange(n) + 0.5) / n, (torch.arange(n) + 0.5) / n, indexing="ij")
        row0, col0 = POSITIONS[position]
        dr, dc = rows - row0, cols - col0
        if shape == "square":
            inside = (dr.abs() <= radius) & (dc.abs() <= radius)
        elif shape == "circle":
            inside = dr**2 + dc**2 <= radius**2
        else:  # triangle pointing up
            inside = (dr <= radius) & (dr >= -radius) & (dc.abs() <= (dr + radius) / 2)
        image = torch.full((3, n, n), 0.1)
        image[:, inside] = torch.tensor(COLOURS[colour])[:, None]
        return image * 2 - 1


class WordEncoder:
    """A frozen text encoder standing in for T5 (``[B, tokens, context_dim]``, zero-padded)
    and CLIP (``[B, vec_dim]``, the mean of the words' vectors)."""

    def __init__(self, *, context_dim: int, vec_dim: int, max_tokens: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.index = {word: i for i, word in enumerate(VOCABULARY)}
        self.token_table = torch.randn(len(VOCABULARY), context_dim, generator=generator)
        self.pooled_table = torch.randn(len(VOCABULARY), vec_dim, generator=generator)
        self.token_table[0] = 0
        self.pooled_table[0] = 0
        self.max_tokens = max_tokens

    def token_ids(self, caption: str) -> torch.Tensor:
        words = caption.split()[: self.max_tokens]
        unknown = [word for word in words if word not in self.index]
        if unknown:
            raise ValueError(f"the embedded text encoder knows no word {unknown[0]!r}; it reads "
                             f"captions of: {' '.join(VOCABULARY[1:])}")
        ids = torch.zeros(self.max_tokens, dtype=torch.long)
        ids[: len(words)] = torch.tensor([self.index[word] for word in words], dtype=torch.long)
        return ids

    def encode_t5(self, captions: list[str]) -> torch.Tensor:
        return self.token_table[torch.stack([self.token_ids(c) for c in captions])]

    def encode_clip(self, captions: list[str]) -> torch.Tensor:
        ids = torch.stack([self.token_ids(c) for c in captions])
        counts = (ids > 0).sum(dim=1, keepdim=True).clamp(min=1)
        return self.pooled_table[ids].sum(dim=1) / counts


class PixelAutoencoder:
    """Images ``[B, 3, H, W]`` <-> latents ``[B, 16, H/2, W/2]``, exactly."""

    downsample = 2
    latent_channels = 16

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        blocks = F.pixel_unshuffle(images, 2)
        return F.pad(blocks, (0, 0, 0, 0, 0, self.latent_channels - blocks.shape[1]))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents[:, :12], 2)
