"""Images of captions during training (``--training.sample_interval``, the core's
``ModelSpec.sampler``): the Euler flow sampler on the reference's shifted schedule, with
classifier-free guidance, from noise of a fixed seed per caption, decoded by the run's
autoencoder (the embedded one, or ``--flux.autoencoder_dir``)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from plait.training_samples import Sample
from plait_flux.encoders import Encoders, build_encoders
from plait_flux.flow import euler_sample, guided, image_ids, sampling_schedule, text_ids, unpack_latents
from plait_flux.pipeline import flux_config


class FluxSampler:
    #: every rank draws the same images (the same captions, noise and steps), rank 0 writes
    #: them: the FSDP/HSDP and tensor-parallel forwards are collectives all ranks join.
    #: Context parallelism shards a training batch's tokens, not a sample's, and pipeline
    #: stages pass token sequences: both are refused.
    parallel_layouts = frozenset({"dp_replicate", "dp_shard", "tp"})

    def __init__(self, config: Any, args: Any, device: torch.device) -> None:
        self.section = flux_config(config)
        self.encoders: Encoders = build_encoders(self.section, args)
        self.guidance = self.section.guidance if args.guidance_embed else None
        self.seed = config.training.seed
        self.device = device

    @torch.no_grad()
    def run(self, model: nn.Module, prompts: Sequence[str]) -> list[Sample]:
        return [Sample(prompt=prompt, image=self.image(model, prompt, seed=self.seed + index))
                for index, prompt in enumerate(prompts)]

    def image(self, model: nn.Module, caption: str, *, seed: int) -> torch.Tensor:
        """One ``uint8 [H, W, 3]`` image of ``caption``."""
        section, encoders, device = self.section, self.encoders, self.device
        side = section.image_size // encoders.downsample  # latent side; 2×2 latents per token
        noise = torch.randn(1, (side // 2) ** 2, 4 * encoders.latent_channels, generator=torch.Generator().manual_seed(seed))
        texts = [encoders.encode_text(caption), encoders.encode_text("")]
        inputs = dict(img_ids=image_ids(side, side)[None].to(device), txt_ids=text_ids(texts[0][0].shape[0])[None].to(device))
        if self.guidance is not None:
            inputs["guidance"] = torch.full((1,), self.guidance, device=device)

        def velocity_of(text: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, t: float) -> torch.Tensor:
            t5, clip = text
            return model(img=x, txt=t5[None].to(device), y=clip[None].to(device),
                         timesteps=torch.full((1,), t, device=device), **inputs).float()

        def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            conditional = velocity_of(texts[0], x, t)
            if section.sample_cfg_scale == 1.0:
                return conditional
            return guided(conditional, velocity_of(texts[1], x, t), section.sample_cfg_scale)

        tokens = euler_sample(velocity, noise.to(device), sampling_schedule(section.sample_steps, noise.shape[1]))
        pixels = encoders.decode_image(unpack_latents(tokens.cpu(), side, side))[0]
        return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous()
