"""The frozen encoders: an image becomes packed latent tokens, a caption its T5 token
embeddings and its pooled CLIP vector. Never trained, never in the optimizer.

Every sample is encoded alone (a batch of one), by the online pipeline and by
``plait preprocess`` alike, so a cached sample is bit for bit the one the online
pipeline computes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from plait.errors import ConfigError
from plait_flux.embedded import PixelAutoencoder, WordEncoder
from plait_flux.flow import pack_latents


@dataclass(frozen=True)
class EncodedSample:
    latents: torch.Tensor
    """Packed latent tokens ``[L_img, 4 × latent channels]``."""
    t5: torch.Tensor
    """T5 token embeddings ``[caption_tokens, context_in_dim]``."""
    clip: torch.Tensor
    """The pooled CLIP vector ``[vec_in_dim]``."""


class Encoders(Protocol):
    identity: str
    downsample: int
    latent_channels: int

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """``[3, H, W]`` in [-1, 1] -> packed latent tokens ``[(H/d/2)·(W/d/2), 4·C]``."""

    def encode_text(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A caption -> (T5 tokens ``[caption_tokens, context]``, pooled CLIP ``[vec]``)."""

    def decode_image(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, C, h, w]`` (as ``encode_image`` made them, unpacked) -> images ``[B, 3, H, W]`` in [-1, 1]."""


def encode(encoders: Encoders, image: torch.Tensor, caption: str) -> EncodedSample:
    t5, clip = encoders.encode_text(caption)
    return EncodedSample(latents=encoders.encode_image(image), t5=t5, clip=clip)


class EmbeddedEncoders:
    """The stand-ins of the embedded default (``plait_flux.embedded``), built from fixed seeds."""

    downsample = PixelAutoencoder.downsample
    latent_channels = PixelAutoencoder.latent_channels

    def __init__(self, *, context_dim: int, vec_dim: int, caption_tokens: int) -> None:
        self.autoencoder = PixelAutoencoder()
        self.words = WordEncoder(context_dim=context_dim, vec_dim=vec_dim, max_tokens=caption_tokens)
        self.identity = f"embedded-encoders(context={context_dim}, vec={vec_dim}, tokens={caption_tokens})"

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return pack_latents(self.autoencoder.encode(image[None]))[0]

    def encode_text(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.words.encode_t5([caption])[0], self.words.encode_clip([caption])[0]

    def decode_image(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(latents)


def _folder(path: str, option: str, what: str) -> Path:
    folder = Path(path)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ConfigError(f"{option} {path} is not a local {what} folder with a config.json (a save_pretrained "
                          "folder; plait downloads nothing)")
    return folder


class PretrainedEncoders:
    """T5 (``T5EncoderModel``) and CLIP (``CLIPTextModel``) through transformers, and the
    autoencoder (``AutoencoderKL``) through diffusers, from local folders (each with its
    tokenizer beside the text models). Latents are the mode of the encoder's distribution,
    shifted and scaled by the autoencoder's ``shift_factor`` and ``scaling_factor``, as
    FLUX trains on them; text follows the reference: padded to length, no attention mask,
    T5's last hidden state and CLIP's pooled output."""

    def __init__(self, *, t5_dir: str, clip_dir: str, autoencoder_dir: str, caption_tokens: int,
                 dtype: str = "float32", device: str = "cpu") -> None:
        folders = {"t5": _folder(t5_dir, "--flux.t5_dir", "T5 encoder"),
                   "clip": _folder(clip_dir, "--flux.clip_dir", "CLIP text model"),
                   "autoencoder": _folder(autoencoder_dir, "--flux.autoencoder_dir", "AutoencoderKL")}
        try:
            from diffusers import AutoencoderKL
            from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel
        except ImportError as error:
            raise ConfigError(f"encoding real images and captions needs transformers and diffusers ({error}): "
                              "pip install transformers diffusers") from None
        torch_dtype = getattr(torch, dtype)
        self.device = torch.device(device)
        self.caption_tokens = caption_tokens
        load = dict(torch_dtype=torch_dtype)
        self.t5 = T5EncoderModel.from_pretrained(folders["t5"], **load).to(self.device).eval().requires_grad_(False)
        self.clip = CLIPTextModel.from_pretrained(folders["clip"], **load).to(self.device).eval().requires_grad_(False)
        self.vae = AutoencoderKL.from_pretrained(folders["autoencoder"], **load).to(self.device).eval()
        self.vae.requires_grad_(False)
        self.t5_tokenizer = AutoTokenizer.from_pretrained(folders["t5"])
        self.clip_tokenizer = AutoTokenizer.from_pretrained(folders["clip"])
        self.clip_tokens = self.clip.config.max_position_embeddings
        vae = self.vae.config
        self.latent_channels = vae.latent_channels
        self.downsample = 2 ** (len(vae.block_out_channels) - 1)
        self.scaling, self.shift = vae.scaling_factor, vae.shift_factor or 0.0
        self.dtype = torch_dtype
        self.identity = (f"pretrained-encoders(t5={folders['t5'].resolve()}, clip={folders['clip'].resolve()}, "
                         f"autoencoder={folders['autoencoder'].resolve()}, dtype={dtype}, tokens={caption_tokens})")

    @property
    def context_dim(self) -> int:
        return self.t5.config.d_model

    @property
    def vec_dim(self) -> int:
        return self.clip.config.hidden_size

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        pixels = image[None].to(self.device, self.dtype)
        latents = self.vae.encode(pixels).latent_dist.mode()
        return pack_latents(((latents - self.shift) * self.scaling).float().cpu())[0]

    def _ids(self, tokenizer: Any, caption: str, length: int) -> torch.Tensor:
        return tokenizer([caption], padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)

    @torch.no_grad()
    def decode_image(self, latents: torch.Tensor) -> torch.Tensor:
        latents = (latents / self.scaling + self.shift).to(self.device, self.dtype)
        return self.vae.decode(latents).sample.float().cpu()

    @torch.no_grad()
    def encode_text(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        t5 = self.t5(input_ids=self._ids(self.t5_tokenizer, caption, self.caption_tokens)).last_hidden_state
        clip = self.clip(input_ids=self._ids(self.clip_tokenizer, caption, self.clip_tokens)).pooler_output
        return t5[0].float().cpu(), clip[0].float().cpu()


def build_encoders(section: Any, args: Any) -> Encoders:
    """The run's encoders: the pretrained ones when ``--flux.t5_dir`` etc. are given, else
    the embedded stand-ins; their widths are checked against the model's."""
    dirs = (section.t5_dir, section.clip_dir, section.autoencoder_dir)
    if not any(dirs):
        encoders: Encoders = EmbeddedEncoders(context_dim=args.context_in_dim, vec_dim=args.vec_in_dim,
                                              caption_tokens=section.caption_tokens)
        widths = (args.context_in_dim, args.vec_in_dim)
    else:
        if not all(dirs):
            raise ConfigError("give all three encoder folders, --flux.t5_dir, --flux.clip_dir and "
                              "--flux.autoencoder_dir, or none (the embedded stand-ins)")
        encoders = PretrainedEncoders(t5_dir=section.t5_dir, clip_dir=section.clip_dir,
                                      autoencoder_dir=section.autoencoder_dir, caption_tokens=section.caption_tokens,
                                      dtype=section.encoder_dtype, device=section.encoder_device)
        widths = (encoders.context_dim, encoders.vec_dim)
    check_widths(latent_features=4 * encoders.latent_channels, context=widths[0], vec=widths[1], args=args,
                 source=encoders.identity)
    return encoders


def check_widths(*, latent_features: int, context: int, vec: int, args: Any, source: str) -> None:
    """The encoders' (or a cache's) widths are the model's, or one message naming each that differs."""
    problems = [f"{what} {theirs} where the model takes {ours} ({field})" for what, theirs, ours, field in (
        ("image tokens of", latent_features, args.in_channels, "in_channels"),
        ("T5 embeddings of", context, args.context_in_dim, "context_in_dim"),
        ("pooled CLIP vectors of", vec, args.vec_in_dim, "vec_in_dim"),
    ) if theirs != ours]
    if problems:
        raise ConfigError(f"{source} gives " + "; ".join(problems) +
                          ": choose a flavor (or --model.args.*) of those widths, or other encoders")
