"""``plait preprocess`` for flux (``ModelSpec.preprocess``): the frozen encoders run once
over the run's dataset and their outputs become a cache folder (``plait_flux.cache``)
that ``--data.dataset`` then names; training loads no encoder."""
from __future__ import annotations

import logging
from typing import Any

from plait.errors import ConfigError
from plait_flux.cache import is_cache, write_cache
from plait_flux.pipeline import OnlineSamples, encoded_samples, flux_config

logger = logging.getLogger("plait")


def preprocess(job: Any, output: str) -> str:
    config = job.config
    if is_cache(config.data.dataset):
        raise ConfigError(f"--data.dataset {config.data.dataset} is already a preprocessing cache: train on it, "
                          "or point --data.dataset at the images")
    samples = encoded_samples(config, job.model_args)
    assert isinstance(samples, OnlineSamples)
    section = flux_config(config)
    step = max(1, len(samples) // 10)

    def progress(done: int, total: int) -> None:
        if done % step == 0 or done == total:
            logger.info("encoded %d / %d samples", done, total)

    manifest = write_cache(output, samples.dataset, samples.encoders, image_size=section.image_size,
                           caption_tokens=section.caption_tokens, seed=config.training.seed,
                           shard_size=section.cache_shard_size, crop=section.crop, progress=progress)
    return f"{manifest['samples']} encoded samples of {manifest['source']} ({len(manifest['shards'])} shard(s))"
