"""Real encoders from local folders (tiny random T5, CLIP and AutoencoderKL built here,
nothing downloaded), an image folder with captions, and the preprocessing cache: the
cached batches are the online ones bit for bit."""
import dataclasses
import json

import pytest
import torch

from plait.config import JobConfig
from plait.data.batch import DataRequest
from plait.errors import ConfigError
from plait_flux.cache import CachedSamples, write_cache
from plait_flux.config import FluxConfig
from plait_flux.pipeline import FluxPipeline, encoded_samples, tokens_per_sample
from plait_flux.spec import FLAVORS

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

ARGS = FLAVORS["flux-debug-tiny-guidance"]  # context 32, vec 16, 64 features per image token
WORDS = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "cat", "dog", "on", "the", "mat"]


def save_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                                     unk_token="<unk>")
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def encoder_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(WORDS), d_model=ARGS.context_in_dim, d_kv=8, d_ff=64, num_layers=1, num_heads=2))
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(WORDS), hidden_size=ARGS.vec_in_dim, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=12, eos_token_id=1, pad_token_id=0, bos_token_id=1))
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  layers_per_block=1, norm_num_groups=4, scaling_factor=0.36, shift_factor=0.11)
    for name, model in (("t5", t5), ("clip", clip), ("vae", vae)):
        model.save_pretrained(root / name)
    save_tokenizer(root / "t5")
    save_tokenizer(root / "clip")
    return {"t5_dir": str(root / "t5"), "clip_dir": str(root / "clip"), "autoencoder_dir": str(root / "vae")}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    captions = ["a red cat", "a blue dog on the mat", "a cat on the mat", "a dog", "the red mat", "a blue cat"]
    for i, caption in enumerate(captions):
        size = (20 + 4 * i, 16)  # not square: resized and centre-cropped
        pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"{i:02d}.png")
        if i % 2:
            (root / f"{i:02d}.txt").write_text(caption)
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i:02d}.png", "text": c}) + "\n"
                                                 for i, c in enumerate(captions) if i % 2 == 0))
    return root


def config_for(dataset, encoder_dirs, **flux):
    config = JobConfig()
    config.flux = FluxConfig(**{"image_size": 8, "caption_tokens": 6, **encoder_dirs, **flux})
    config.data.dataset = str(dataset)
    config.data.held_out_share = 0.0
    return config


def pipeline(config, *, batch=3):
    return FluxPipeline(DataRequest(config=config, model_args=ARGS, local_batch_size=batch, dp_rank=0, dp_world_size=1))


def test_cached_batches_are_the_online_batches(tmp_path, encoder_dirs, images):
    online_config = config_for(images, encoder_dirs, t5_dropout=0.4, clip_dropout=0.4)
    samples = encoded_samples(online_config, ARGS)
    assert len(samples) == 6 and samples.dataset.captions[1] == "a blue dog on the mat"
    assert tokens_per_sample(online_config, ARGS) == 4 + 6  # 8 px / 2 (autoencoder) / 2 (patch) = 2×2 tokens
    manifest = write_cache(tmp_path / "cache", samples.dataset, samples.encoders, image_size=8, caption_tokens=6,
                           seed=0, shard_size=4)
    assert manifest["shards"] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert manifest["latent_shape"] == [4, 64] and manifest["t5_shape"] == [6, 32] and manifest["clip_dim"] == 16
    cached_config = config_for(tmp_path / "cache", {}, t5_dropout=0.4, clip_dropout=0.4)
    assert isinstance(encoded_samples(cached_config, ARGS), CachedSamples)
    assert tokens_per_sample(cached_config, ARGS) == 10
    online, cached = pipeline(online_config), pipeline(cached_config)
    for _ in range(4):  # two epochs, with prompt dropout
        (inputs, target), (cached_inputs, cached_target) = next(online), next(cached)
        torch.testing.assert_close(cached_target, target, rtol=0, atol=0)
        assert inputs.keys() == cached_inputs.keys()
        for name in inputs:
            torch.testing.assert_close(cached_inputs[name], inputs[name], rtol=0, atol=0, msg=name)
    # the latents are the autoencoder's, shifted and scaled
    encoders = samples.encoders
    image, _ = samples.dataset[0]
    with torch.no_grad():
        mode = encoders.vae.encode(image[None]).latent_dist.mode()
    from plait_flux.flow import pack_latents

    torch.testing.assert_close(samples[0].latents, pack_latents((mode - 0.11) * 0.36)[0])


def test_bad_folders_are_messages(tmp_path, encoder_dirs, images):
    with pytest.raises(ConfigError, match="not a local T5 encoder folder"):
        encoded_samples(config_for(images, dict(encoder_dirs, t5_dir=str(tmp_path))), ARGS)
    bare = tmp_path / "bare"
    bare.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(bare / "x.png")
    with pytest.raises(ConfigError, match="x.png has no caption: add x.txt"):
        encoded_samples(config_for(bare, encoder_dirs), ARGS)
    with pytest.raises(ConfigError, match="T5 embeddings of 32 where the model takes 16"):
        encoded_samples(config_for(images, encoder_dirs), dataclasses.replace(ARGS, context_in_dim=16))
    samples = encoded_samples(config_for(images, encoder_dirs), ARGS)
    write_cache(tmp_path / "cache", samples.dataset, samples.encoders, image_size=8, caption_tokens=6, seed=0,
                shard_size=8)
    with pytest.raises(ConfigError, match="pass --flux.image_size 8 --flux.caption_tokens 6"):
        encoded_samples(config_for(tmp_path / "cache", {}, caption_tokens=7), ARGS)
