"""flux's data pipeline (``ModelSpec.data_pipeline``): image–caption pairs -> latents and
text embeddings (frozen encoders, never trained) -> the flow-matching inputs and target.

``--data.dataset`` picks the samples: empty, the embedded shapes dataset; a folder with a
``flux-cache.json``, the latents and embeddings ``plait preprocess`` wrote (no encoder is
loaded); any other folder or file, image–caption pairs (an image folder, webdataset or
parquet shards, a Hugging Face dataset saved on disk: ``plait_flux.sources``) encoded as
they are read by the encoders of ``--flux.t5_dir/clip_dir/autoencoder_dir``.

Each epoch visits the training samples in an order drawn from (seed, epoch); every global
batch takes the next ``local_batch_size × dp_world_size`` of them and rank r keeps rows
``[r·B, (r+1)·B)``. A sample's random draws (timestep, noise, prompt dropout) come from a
generator seeded by (seed, epoch, sample index), so a step trains on the same inputs in
every data-parallel layout, and the whole state is (epoch, position): exact resume.
Validation (``held_out=True``) reads the held-out samples in index order, each at a fixed
timestep and noise, with no dropout.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from plait.data.batch import DataRequest, TensorBatch
from plait.errors import CheckpointError, ConfigError
from plait_flux.cache import MANIFEST, CachedSamples, is_cache
from plait_flux.config import FluxConfig
from plait_flux.embedded import ShapesDataset
from plait_flux.encoders import EmbeddedEncoders, EncodedSample, Encoders, build_encoders, check_widths, encode
from plait_flux.flow import image_ids, noised, sample_timesteps, text_ids
from plait_flux.sources import pair_source

_STATE_VERSION = 1
_MIX = 1_000_003


def flux_config(config: Any) -> FluxConfig:
    """The run's ``--flux`` section (its defaults when the section is not registered)."""
    return getattr(config, "flux", None) or FluxConfig()


def image_tokens(config: Any) -> int:
    """Packed latent tokens of one image: from the cache's manifest when training on one,
    else (image side / the autoencoder's downsampling / the 2×2 patch)²."""
    section, dataset = flux_config(config), config.data.dataset
    if is_cache(dataset):
        return int(json.loads((Path(dataset) / MANIFEST).read_text())["latent_shape"][0])
    downsample = EmbeddedEncoders.downsample
    vae_config = Path(section.autoencoder_dir) / "config.json"
    if section.autoencoder_dir and vae_config.is_file():
        downsample = 2 ** (len(json.loads(vae_config.read_text()).get("block_out_channels", [0])) - 1)
    return (section.image_size // downsample // 2) ** 2


def tokens_per_sample(config: Any, args: Any) -> int:
    """Image tokens plus text tokens of one sample."""
    return image_tokens(config) + flux_config(config).caption_tokens


def _generator(*parts: int) -> torch.Generator:
    seed = 0
    for part in parts:
        seed = (seed * _MIX + part) % (1 << 62)
    return torch.Generator().manual_seed(seed)


class OnlineSamples:
    """Samples encoded as they are read, by the frozen encoders."""

    def __init__(self, dataset: Any, encoders: Encoders) -> None:
        self.dataset, self.encoders = dataset, encoders
        self.identity = f"{dataset.identity} through {encoders.identity}"
        self.empty_caption = encoders.encode_text("")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> EncodedSample:
        return encode(self.encoders, *self.dataset[index])


def dataset_of(config: Any) -> Any:
    """The image–caption pairs of a run: ``--data.dataset`` (``plait_flux.sources``), else
    the embedded shapes."""
    section, dataset = flux_config(config), config.data.dataset
    if dataset:
        return pair_source(dataset, image_size=section.image_size, crop=section.crop, seed=config.training.seed)
    return ShapesDataset(size=section.embedded_samples, image_size=section.image_size)


def encoded_samples(config: Any, args: Any) -> CachedSamples | OnlineSamples:
    """What the pipeline reads: a preprocessing cache, or a dataset through its encoders."""
    section, dataset = flux_config(config), config.data.dataset
    if config.data.mixture:
        raise ConfigError("flux reads one dataset: an image folder, a plait preprocess cache, or (none given) "
                          "the embedded shapes; drop --data.mixture")
    if is_cache(dataset):
        samples = CachedSamples(dataset)
        manifest = samples.manifest
        stored = {"image_size": manifest["image_size"], "caption_tokens": manifest["caption_tokens"],
                  "crop": manifest.get("crop", "center")}
        asked = {"image_size": section.image_size, "caption_tokens": section.caption_tokens, "crop": section.crop}
        if stored != asked:
            raise ConfigError(f"the cache {dataset} holds {stored} but the run asks {asked}: pass "
                              + " ".join(f"--flux.{k} {v}" for k, v in stored.items()))
        check_widths(latent_features=manifest["latent_shape"][-1], context=manifest["t5_shape"][-1],
                     vec=manifest["clip_dim"], args=args, source=f"the cache {dataset}")
        return samples
    if dataset and not section.t5_dir:
        raise ConfigError(f"--data.dataset {dataset} is not a plait preprocess cache (no {MANIFEST}); encoding "
                          "images needs the frozen encoders: --flux.t5_dir, --flux.clip_dir and "
                          "--flux.autoencoder_dir (local folders)")
    return OnlineSamples(dataset_of(config), build_encoders(section, args))


class FluxPipeline:
    """An endless iterator of ``(TensorBatch, velocity target)``; see the module docstring."""

    def __init__(self, request: DataRequest) -> None:
        config, args = request.config, request.model_args
        self.section = section = flux_config(config)
        self.samples = encoded_samples(config, args)
        held = round(len(self.samples) * config.data.held_out_share)
        train = len(self.samples) - held
        self.indices = list(range(train, len(self.samples))) if request.held_out else list(range(train))
        if not self.indices:
            raise ConfigError(
                f"--data.held_out_share {config.data.held_out_share} leaves no "
                f"{'held-out' if request.held_out else 'training'} sample of the {len(self.samples)}: "
                "choose a share that leaves some on both sides"
            )
        self.guidance = section.guidance if args.guidance_embed else None
        self.held_out = request.held_out
        self.local_batch_size = request.local_batch_size
        self.dp_rank, self.dp_world_size = request.dp_rank, request.dp_world_size
        self.seed = config.training.seed
        self.identity = f"{self.samples.identity}[{'held out' if self.held_out else 'train'}: {len(self.indices)}]"
        self._epoch = 0
        self._position = 0
        self._order_cache: tuple[int, list[int]] | None = None

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> FluxPipeline:
        return self

    def __next__(self) -> tuple[TensorBatch, torch.Tensor]:
        group = []
        for _ in range(self.local_batch_size * self.dp_world_size):
            group.append((self._epoch, self._order(self._epoch)[self._position]))
            self._position += 1
            if self._position == len(self.indices):
                self._epoch, self._position = self._epoch + 1, 0
        start = self.dp_rank * self.local_batch_size
        return self.batch(group[start : start + self.local_batch_size])

    def _order(self, epoch: int) -> list[int]:
        if self._order_cache is None or self._order_cache[0] != epoch:
            if self.held_out:
                order = self.indices
            else:
                permutation = torch.randperm(len(self.indices), generator=_generator(self.seed, epoch))
                order = [self.indices[i] for i in permutation.tolist()]
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def batch(self, samples: list[tuple[int, int]]) -> tuple[TensorBatch, torch.Tensor]:
        """The model inputs and velocity target of ``(epoch, sample index)`` pairs."""
        section = self.section
        latents, t5, clip, times, noises = [], [], [], [], []
        empty_t5, empty_clip = self.samples.empty_caption
        for epoch, index in samples:
            sample = self.samples[index]
            generator = _generator(self.seed, epoch, index, int(self.held_out))
            noises.append(torch.randn(sample.latents.shape, generator=generator))
            if self.held_out:
                times.append(torch.tensor([section.validation_timesteps[index % len(section.validation_timesteps)]]))
                drop_t5 = drop_clip = False
            else:
                times.append(sample_timesteps(1, generator=generator, sampling=section.timestep_sampling,
                                              logit_mean=section.logit_mean, logit_std=section.logit_std,
                                              shift=section.timestep_shift))
                drop_t5, drop_clip = (torch.rand(2, generator=generator) < torch.tensor(
                    [section.t5_dropout, section.clip_dropout])).tolist()
            latents.append(sample.latents)
            t5.append(empty_t5 if drop_t5 else sample.t5)
            clip.append(empty_clip if drop_clip else sample.clip)
        timesteps = torch.cat(times).float()
        img, target = noised(torch.stack(latents), torch.stack(noises), timesteps)
        batch, n_img, n_txt = len(samples), img.shape[1], t5[0].shape[0]
        side = int(math.isqrt(n_img))
        inputs = TensorBatch(
            img=img,
            img_ids=image_ids(2 * side, 2 * side).expand(batch, -1, -1).contiguous(),
            txt=torch.stack(t5),
            txt_ids=text_ids(n_txt).expand(batch, -1, -1).contiguous(),
            timesteps=timesteps,
            y=torch.stack(clip),
        )
        if self.guidance is not None:
            inputs["guidance"] = torch.full((batch,), self.guidance)
        return inputs, target

    # ---------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "source": self.identity, "epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise CheckpointError(f"flux data pipeline state version {state.get('version')!r} is not the "
                                  f"supported {_STATE_VERSION}; resume with the plait version that wrote it")
        if state.get("source") != self.identity:
            raise CheckpointError(
                f"the checkpoint's flux data state belongs to {state.get('source')!r} but this run reads "
                f"{self.identity!r}: resume with the same --flux and --data options, or start a fresh run"
            )
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
