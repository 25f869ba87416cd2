"""Samples of fixed prompts during training (``--training.sample_interval``): greedy
continuations for a language model, or what a model's own ``ModelSpec.sampler`` makes (an
image for each caption, for a diffusion model).

Runs between steps in eval mode under ``inference_mode``: greedy decoding draws no random
numbers, a model's sampler draws from its own seeded generator, and nothing of the training
state changes, so the training losses are the same, bit for bit, with and without it.
Only a model that is whole on one process can sample, unless its sampler names the
parallelism it runs under (``Sampler.parallel_layouts``: every rank then samples the same
prompts from the same seed and rank 0 writes them); any other layout is refused before
training starts.
"""
from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from plait.config import JobConfig
from plait.data.tokenizer import Tokenizer
from plait.errors import ConfigError
from plait.generation import generate


@dataclass(frozen=True)
class Sample:
    """What a model made of one prompt: a text, an image (``uint8 [height, width, 3]``), or both."""

    prompt: str
    text: str = ""
    image: torch.Tensor | None = None


class Sampler(Protocol):
    """A model's own sampling (``ModelSpec.sampler(config, model_args, device)`` builds it).

    A sampler may set ``parallel_layouts``, the parallelism degrees (``"dp_shard"``,
    ``"tp"``, ...) under which ``run`` works on every rank at once with the same prompts and
    seeds and returns the same samples (every forward a collective all ranks join); without
    it sampling needs the whole model on one process."""

    def run(self, model: nn.Module, prompts: Sequence[str]) -> list[Sample]: ...


def write_png(path: Path, image: torch.Tensor) -> None:
    """An RGB ``uint8 [height, width, 3]`` image as a PNG file (zlib, no imaging library)."""
    height, width, _ = image.shape
    rows = b"".join(b"\x00" + bytes(row) for row in image.contiguous().numpy().reshape(height, width * 3))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def check_layout(config: JobConfig, *, world_size: int, parallel_layouts: frozenset[str] = frozenset()) -> None:
    """Refuse sampling where the model is not whole on one process, unless the sampler runs
    under every parallelism degree of the run (``parallel_layouts``)."""
    if world_size <= 1:
        return
    p = config.parallelism
    degrees = {name: value for name, value in (("dp_replicate", p.dp_replicate), ("dp_shard", p.dp_shard),
               ("tp", p.tp), ("pp", p.pp), ("cp", p.cp), ("ep", p.ep)) if value != 1} or {"dp_shard": -1}
    refused = [name for name in degrees if name not in parallel_layouts]
    if not refused:
        return
    layout = ", ".join(f"{name} {value}" for name, value in degrees.items())
    if not parallel_layouts:
        raise ConfigError(
            f"--training.sample_interval needs the whole model on one process, but this run has {world_size} "
            f"ranks ({layout}); drop it and sample from a checkpoint with `plait generate`"
        )
    raise ConfigError(
        f"--training.sample_interval: this model samples under {', '.join(sorted(parallel_layouts))} only, and "
        f"this run has {world_size} ranks ({layout}, {', '.join(refused)} not supported); drop "
        "--training.sample_interval and sample from a checkpoint, or use a layout without "
        f"{', '.join(refused)}"
    )


class GreedyContinuations:
    """A language model's samples. ``max_len``: the longest sequence the model takes (None: no limit)."""

    def __init__(self, config: JobConfig, tokenizer: Tokenizer, *, device: torch.device, max_len: int | None) -> None:
        training = config.training
        for prompt in training.sample_prompts:
            length = 1 + len(tokenizer.encode(prompt)) + training.sample_max_new_tokens
            if max_len is not None and length > max_len:
                raise ConfigError(
                    f"--training.sample_prompts {prompt!r} plus --training.sample_max_new_tokens "
                    f"{training.sample_max_new_tokens} make {length} tokens, more than the model's {max_len} "
                    "(--training.seq_len): shorten the prompt or lower --training.sample_max_new_tokens"
                )
        self.max_new_tokens = training.sample_max_new_tokens
        self.tokenizer = tokenizer
        self.device = device

    def run(self, model: nn.Module, prompts: Sequence[str]) -> list[Sample]:
        """The greedy continuation of each prompt, generated one prompt at a time."""
        return [self._continue(model, prompt) for prompt in prompts]

    def _continue(self, model: nn.Module, prompt: str) -> Sample:
        ids = torch.tensor([[self.tokenizer.bos_id, *self.tokenizer.encode(prompt)]], device=self.device)
        out = generate(model, ids, max_new_tokens=self.max_new_tokens, eos_token_id=self.tokenizer.eos_id,
                       vocab_size=self.tokenizer.vocab_size)  # fmt: skip
        new = [t for t in out[0, ids.shape[1]:].tolist() if t != self.tokenizer.eos_id]
        return Sample(prompt=prompt, text=self.tokenizer.decode(new))


class TrainingSamples:
    """Samples every ``--training.sample_interval`` steps, from the model's own sampler or,
    for a language model, greedy continuations."""

    def __init__(self, config: JobConfig, sampler: Sampler, *, world_size: int) -> None:
        check_layout(config, world_size=world_size, parallel_layouts=frozenset(getattr(sampler, "parallel_layouts", ())))
        self.interval = config.training.sample_interval
        self.prompts: Sequence[str] = config.training.sample_prompts
        self.sampler = sampler

    def due(self, step: int, last_step: int) -> bool:
        return self.interval > 0 and (step % self.interval == 0 or step == last_step)

    def run(self, model: nn.Module) -> list[Sample]:
        was_training = model.training
        model.eval()
        try:
            with torch.compiler.set_stance("force_eager"):  # compiled blocks run as written: no recompilation
                return self.sampler.run(model, self.prompts)
        finally:
            model.train(was_training)
