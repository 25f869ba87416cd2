"""flux's data pipeline: layout-independent batches, exact resume, held-out data, messages."""
import pytest
import torch

from plait.config import JobConfig
from plait.data.batch import DataRequest, TensorBatch
from plait.errors import CheckpointError, ConfigError
from plait_flux.config import FluxConfig
from plait_flux.embedded import PixelAutoencoder, ShapesDataset, WordEncoder
from plait_flux.pipeline import FluxPipeline
from plait_flux.spec import FLAVORS

ARGS = FLAVORS["flux-debug-tiny-guidance"]


def pipeline(*, batch=4, rank=0, world=1, held_out=False, flux=None, **data):
    config = JobConfig()
    config.flux = flux or FluxConfig(embedded_samples=24, image_size=16, caption_tokens=8)
    config.data.held_out_share = data.pop("held_out_share", 0.25)
    for name, value in data.items():
        setattr(config.data, name, value)
    return FluxPipeline(DataRequest(config=config, model_args=ARGS, local_batch_size=batch, dp_rank=rank,
                                    dp_world_size=world, held_out=held_out))


def concat(batches):
    return TensorBatch.concat([b for b, _ in batches]), torch.cat([t for _, t in batches])


def test_batches_are_the_model_inputs():
    inputs, target = next(pipeline())
    assert set(inputs) == {"img", "img_ids", "txt", "txt_ids", "timesteps", "y", "guidance"}
    assert inputs["img"].shape == target.shape == (4, 16, 64)
    assert inputs["txt"].shape == (4, 8, ARGS.context_in_dim) and inputs["y"].shape == (4, ARGS.vec_in_dim)
    assert inputs["img_ids"].shape == (4, 16, 3) and inputs["txt_ids"].shape == (4, 8, 3)
    assert ((0 <= inputs["timesteps"]) & (inputs["timesteps"] <= 1)).all()
    assert inputs.batch_size == 4 and [b.batch_size for b in inputs.split(2)] == [2, 2]


def test_every_data_parallel_layout_trains_on_the_same_samples():
    single = pipeline(batch=4)
    ranks = [pipeline(batch=2, rank=r, world=2) for r in range(2)]
    for _ in range(7):  # across an epoch boundary (18 training samples)
        inputs, target = next(single)
        split_inputs, split_target = concat([next(r) for r in ranks])
        torch.testing.assert_close(split_target, target, rtol=0, atol=0)
        for name in inputs:
            torch.testing.assert_close(split_inputs[name], inputs[name], rtol=0, atol=0)


def test_resume_continues_exactly():
    straight = pipeline()
    expected = [next(straight)[1] for _ in range(6)]
    first = pipeline()
    for _ in range(3):
        next(first)
    resumed = pipeline()
    resumed.load_state_dict(first.state_dict())
    for want in expected[3:]:
        torch.testing.assert_close(next(resumed)[1], want, rtol=0, atol=0)


def test_resume_refuses_other_data():
    other = pipeline(held_out_share=0.5)
    with pytest.raises(CheckpointError, match="same --flux and --data options"):
        other.load_state_dict(pipeline().state_dict())


def test_held_out_samples_are_fixed_and_apart_from_training():
    first, again = next(pipeline(held_out=True)), next(pipeline(held_out=True))
    torch.testing.assert_close(first[1], again[1], rtol=0, atol=0)
    assert first[0]["timesteps"].tolist() == [0.25, 0.5, 0.75, 0.25]  # indices 18.. cycle the fixed times
    train = pipeline()
    seen = {train._order(0)[i] for i in range(18)}
    assert seen == set(range(18))


def test_prompt_dropout_uses_the_empty_caption_per_encoder():
    flux = FluxConfig(embedded_samples=24, image_size=16, caption_tokens=8, t5_dropout=0.5, clip_dropout=0.5)
    inputs, _ = next(pipeline(batch=16, flux=flux, held_out_share=0.0))
    t5_dropped = (inputs["txt"] == 0).all(dim=(1, 2))
    clip_dropped = (inputs["y"] == 0).all(dim=1)
    assert 0 < t5_dropped.sum() < 16 and 0 < clip_dropped.sum() < 16
    assert (t5_dropped != clip_dropped).any()  # drawn separately


def test_embedded_encoders():
    dataset = ShapesDataset(size=4, image_size=16)
    image, caption = dataset[2]
    assert image.shape == (3, 16, 16) and -1 <= image.min() and image.max() <= 1
    assert caption.startswith("a ") and dataset[2][1] == caption
    ae = PixelAutoencoder()
    torch.testing.assert_close(ae.decode(ae.encode(image[None])), image[None], rtol=0, atol=0)
    encoder = WordEncoder(context_dim=8, vec_dim=4, max_tokens=6)
    assert encoder.encode_t5([caption, ""]).shape == (2, 6, 8)
    with pytest.raises(ValueError, match="knows no word 'dog'"):
        encoder.encode_t5(["a dog"])


def test_bad_inputs_are_messages():
    with pytest.raises(ConfigError, match="not a plait preprocess cache.*--flux.t5_dir"):
        pipeline(dataset="./images")
    with pytest.raises(ConfigError, match="drop --data.mixture"):
        pipeline(mixture=("a@1",))
    with pytest.raises(ConfigError, match="all three encoder folders"):
        pipeline(flux=FluxConfig(t5_dir="./t5"))
    with pytest.raises(ConfigError, match="leaves no held-out sample"):
        pipeline(held_out=True, held_out_share=0.0)
    with pytest.raises(ConfigError, match="multiple of 4"):
        FluxConfig(image_size=30).validate()
    with pytest.raises(ConfigError, match="timestep_sampling 'cosine'"):
        FluxConfig(timestep_sampling="cosine").validate()
