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


def pairs_of(source):
    return [source[i] for i in range(len(source))]


def test_webdataset_parquet_and_saved_hf_datasets_hold_the_folder_pairs(tmp_path, images):
    """The same images and captions as tar shards, parquet shards and a Hugging Face
    dataset saved on disk read as the image folder does, pixel for pixel."""
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from plait_flux.sources import ImageFolder, ParquetShards, SavedHFDataset, TarShards, pair_source

    folder = ImageFolder(str(images), image_size=8)
    encoded = [(images / f"{i:02d}.png").read_bytes() for i in range(len(folder))]
    (tmp_path / "tars").mkdir()
    for shard, indices in enumerate(([0, 1, 2, 3], [4, 5])):
        with tarfile.open(tmp_path / "tars" / f"shard-{shard}.tar", "w") as tar:
            for i in indices:
                caption = folder.captions[i].encode() if i % 2 else json.dumps({"caption": folder.captions[i]}).encode()
                for name, data in ((f"{i:04d}.png", encoded[i]), (f"{i:04d}.{'txt' if i % 2 else 'json'}", caption)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (tmp_path / "parquet").mkdir()
    for shard, indices in enumerate(([0, 1, 2], [3, 4, 5])):
        table = pa.table({"image": [{"bytes": encoded[i], "path": None} for i in indices],
                          "text": [folder.captions[i] for i in indices]})
        pq.write_table(table, tmp_path / "parquet" / f"part-{shard}.parquet", row_group_size=2)
    datasets = pytest.importorskip("datasets")
    saved = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in encoded],
                                        "caption": folder.captions}).cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": saved}).save_to_disk(str(tmp_path / "hf"))

    expected = pairs_of(folder)
    for path, kind in ((tmp_path / "tars", TarShards), (tmp_path / "parquet", ParquetShards),
                       (tmp_path / "hf", SavedHFDataset)):
        source = pair_source(str(path), image_size=8, crop="center", seed=0)
        assert isinstance(source, kind)
        for (pixels, caption), (want_pixels, want_caption) in zip(pairs_of(source), expected, strict=True):
            assert caption == want_caption
            torch.testing.assert_close(pixels, want_pixels, rtol=0, atol=0)
    pq.write_table(pa.table({"picture": [b""], "text": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ConfigError, match="has the columns picture, text; flux reads an image column"):
        pair_source(str(tmp_path / "bad.parquet"), image_size=8, crop="center", seed=0)
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        info = tarfile.TarInfo("0001.png")
        info.size = len(encoded[0])
        tar.addfile(info, io.BytesIO(encoded[0]))
    with pytest.raises(ConfigError, match="sample '0001' lacks a caption"):
        pair_source(str(tmp_path / "bad.tar"), image_size=8, crop="center", seed=0)
    with pytest.raises(ConfigError, match="does not exist"):
        pair_source(str(tmp_path / "nothing"), image_size=8, crop="center", seed=0)


def test_random_crops_follow_the_seed_and_the_cache_records_it(tmp_path, encoder_dirs, images):
    from plait_flux.sources import ImageFolder

    center = pairs_of(ImageFolder(str(images), image_size=8))
    crops = [pairs_of(ImageFolder(str(images), image_size=8, crop="random", seed=seed)) for seed in (0, 0, 1)]
    for first, again in zip(crops[0], crops[1]):
        torch.testing.assert_close(first[0], again[0], rtol=0, atol=0)  # the same crop every time
    # every image is wider than tall (20×16 and up, resized to 10×8 and up): an 8×8 square has 3+ positions
    assert any(not torch.equal(crop[0], centred[0]) for crop, centred in zip(crops[0], center))
    assert any(not torch.equal(crop[0], other[0]) for crop, other in zip(crops[0], crops[2]))

    online_config = config_for(images, encoder_dirs, crop="random")
    online_config.training.seed = 1
    samples = encoded_samples(online_config, ARGS)
    manifest = write_cache(tmp_path / "cache", samples.dataset, samples.encoders, image_size=8, caption_tokens=6,
                           seed=1, shard_size=8, crop="random")
    assert manifest["augmentation_seed"] == 1 and manifest["crop"] == "random"
    assert "crop=random, augmentation_seed=1" in manifest["source"]
    cached_config = config_for(tmp_path / "cache", {}, crop="random")
    cached_config.training.seed = 1
    (inputs, target), (cached_inputs, cached_target) = next(pipeline(online_config)), next(pipeline(cached_config))
    torch.testing.assert_close(cached_target, target, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="pass --flux.image_size 8 --flux.caption_tokens 6 --flux.crop random"):
        encoded_samples(config_for(tmp_path / "cache", {}), ARGS)
