"""The ``--flux.*`` options: image size, captions, the flow-matching objective."""
from __future__ import annotations

from dataclasses import dataclass

from plait.errors import ConfigError

from plait_flux.flow import TIMESTEP_SAMPLINGS


@dataclass(kw_only=True, slots=True)
class FluxConfig:
    """Data pipeline and objective of the flux model package."""

    image_size: int = 32
    """Side of the square training images, in pixels (a multiple of 4 for the embedded
    autoencoder: 2×2 pixels per latent, 2×2 latents per token)."""
    crop: str = "center"
    """How images are cropped to a square after resizing: center, or random (a position per
    sample drawn from --training.seed, the same every epoch and recorded in the cache)."""
    caption_tokens: int = 16
    """Text tokens per caption (longer captions are cut, shorter ones padded)."""
    embedded_samples: int = 4096
    """Images in the embedded shapes dataset (used when --data.dataset is empty)."""
    timestep_sampling: str = "uniform"
    """How training draws timesteps: uniform or logit_normal."""
    logit_mean: float = 0.0
    """Mean of the normal under the sigmoid (logit_normal)."""
    logit_std: float = 1.0
    """Standard deviation of the normal under the sigmoid (logit_normal)."""
    timestep_shift: float = 1.0
    """Shift timesteps towards noise: t -> s·t / (1 + (s - 1)·t); 1 keeps them."""
    t5_dropout: float = 0.1
    """Probability that a sample's T5 text tokens are those of the empty caption (classifier-free guidance)."""
    clip_dropout: float = 0.1
    """Probability that a sample's pooled CLIP vector is that of the empty caption."""
    guidance: float = 1.0
    """Guidance scale given to flavors that embed it (flux-dev) during training."""
    validation_timesteps: tuple[float, ...] = (0.25, 0.5, 0.75)
    """Validation computes the loss of each held-out sample at one of these times, in turn."""
    t5_dir: str = ""
    """Local folder of a T5 encoder (transformers T5EncoderModel and its tokenizer); with
    --flux.clip_dir and --flux.autoencoder_dir it replaces the embedded stand-ins."""
    clip_dir: str = ""
    """Local folder of a CLIP text model (transformers CLIPTextModel and its tokenizer)."""
    autoencoder_dir: str = ""
    """Local folder of the FLUX autoencoder (diffusers AutoencoderKL)."""
    encoder_dtype: str = "float32"
    """Dtype of the frozen encoders: float32 or bfloat16."""
    encoder_device: str = "cpu"
    """Where the frozen encoders run (cpu, cuda, ...)."""
    cache_shard_size: int = 1024
    """Samples per safetensors shard written by plait preprocess."""
    sample_steps: int = 20
    """Euler steps of the images sampled every --training.sample_interval steps (of the
    captions in --training.sample_prompts)."""
    sample_cfg_scale: float = 3.0
    """Classifier-free guidance scale of those samples (1: the conditional velocity alone)."""

    def validate(self) -> None:
        if self.image_size < 4 or self.image_size % 4:
            raise ConfigError(f"--flux.image_size must be a positive multiple of 4, got {self.image_size}")
        if self.crop not in ("center", "random"):
            raise ConfigError(f"--flux.crop must be center or random, got {self.crop!r}")
        if self.caption_tokens < 1:
            raise ConfigError(f"--flux.caption_tokens must be >= 1, got {self.caption_tokens}")
        if self.embedded_samples < 2:
            raise ConfigError(f"--flux.embedded_samples must be >= 2, got {self.embedded_samples}")
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ConfigError(f"--flux.timestep_sampling {self.timestep_sampling!r} is not one of: "
                              f"{', '.join(TIMESTEP_SAMPLINGS)}")
        if self.timestep_shift <= 0 or self.logit_std <= 0:
            raise ConfigError("--flux.timestep_shift and --flux.logit_std must be positive")
        for name in ("t5_dropout", "clip_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"--flux.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.encoder_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"--flux.encoder_dtype must be float32 or bfloat16, got {self.encoder_dtype!r}")
        if self.sample_steps < 1 or self.sample_cfg_scale < 0:
            raise ConfigError(f"--flux.sample_steps must be >= 1 and --flux.sample_cfg_scale >= 0, got "
                              f"{self.sample_steps} and {self.sample_cfg_scale}")
        if self.cache_shard_size < 1:
            raise ConfigError(f"--flux.cache_shard_size must be >= 1, got {self.cache_shard_size}")
        if not self.validation_timesteps or not all(0.0 <= t <= 1.0 for t in self.validation_timesteps):
            raise ConfigError(f"--flux.validation_timesteps must be times in [0, 1], got "
                              f"{list(self.validation_timesteps)}")
