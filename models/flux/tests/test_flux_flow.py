"""Rectified flow: objective, schedule, sampler, guidance and latent packing."""
import math

import pytest
import torch

from plait_flux.flow import (euler_sample, flow_matching_loss, guided, image_ids, noised, pack_latents,
                             sample_timesteps, sampling_schedule, shift_timesteps, unpack_latents)


def test_noised_interpolates_and_targets_the_velocity():
    x0, noise, t = torch.randn(3, 4, 5), torch.randn(3, 4, 5), torch.tensor([0.0, 0.5, 1.0])
    x_t, target = noised(x0, noise, t)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[1], (x0[1] + noise[1]) / 2)
    torch.testing.assert_close(x_t[2], noise[2])
    torch.testing.assert_close(target, noise - x0)
    assert flow_matching_loss(target, target) == 0
    torch.testing.assert_close(flow_matching_loss(target + 2, target), torch.tensor(4.0))


def test_timestep_sampling_ranges_and_shift():
    g = torch.Generator().manual_seed(0)
    uniform = sample_timesteps(20_000, generator=g)
    assert 0 <= uniform.min() and uniform.max() <= 1 and abs(uniform.mean() - 0.5) < 0.01
    logit = sample_timesteps(20_000, generator=g, sampling="logit_normal", logit_mean=1.0)
    assert abs(torch.logit(logit).mean() - 1.0) < 0.03 and abs(torch.logit(logit).std() - 1.0) < 0.03
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(shift_timesteps(t, 3.0), 3 * t / (1 + 2 * t))
    torch.testing.assert_close(shift_timesteps(t, 1.0), t)
    with pytest.raises(ValueError, match="uniform, logit_normal"):
        sample_timesteps(1, generator=g, sampling="cosine")


def test_schedule_is_the_reference_formula():
    steps, image_tokens = 4, 1024
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (image_tokens - 256)
    expected = [1.0] + [math.exp(mu) / (math.exp(mu) + (1 / t - 1)) for t in (0.75, 0.5, 0.25)] + [0.0]
    assert sampling_schedule(steps, image_tokens) == pytest.approx(expected, abs=1e-12)
    assert sampling_schedule(steps, image_tokens, shift=False) == pytest.approx([1, 0.75, 0.5, 0.25, 0])


def test_euler_integrates_an_analytic_velocity_field_exactly():
    """For x_t = (1 - t)·x0 + t·noise the velocity noise - x0 is constant along the path:
    Euler steps from noise at t = 1 land on x0 at t = 0 (to rounding), on any schedule."""
    x0, noise = torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    x = euler_sample(lambda x, t: noise - x0, noise.clone(), sampling_schedule(7, 512))
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-12)
    # dx/dt = x (from t = 1 down to 0): Euler with n steps gives the product of (1 - dt)
    schedule = [1 - i / 50 for i in range(51)]
    x = euler_sample(lambda x, t: x, torch.ones(1, dtype=torch.float64), schedule)
    assert x.item() == pytest.approx((1 - 1 / 50) ** 50, rel=1e-12)


def test_classifier_free_guidance_is_its_definition():
    cond, uncond = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(guided(cond, uncond, 1.0), cond)
    torch.testing.assert_close(guided(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(guided(cond, uncond, 4.0), uncond + 4.0 * (cond - uncond))


def test_packing_is_2x2_patches_row_major_and_invertible():
    latents = torch.randn(2, 16, 6, 8)
    packed = pack_latents(latents)
    assert packed.shape == (2, 12, 64)
    # token (row 1, col 2) holds latents [:, 2:4, 4:6] channel-major
    torch.testing.assert_close(packed[:, 1 * 4 + 2], latents[:, :, 2:4, 4:6].flatten(1))
    torch.testing.assert_close(unpack_latents(packed, 6, 8), latents)
    ids = image_ids(6, 8)
    assert ids[1 * 4 + 2].tolist() == [0.0, 1.0, 2.0]


def test_the_training_sampler_draws_the_image_an_exact_velocity_leads_to():
    """With the exact velocity of one image, ``(x - x0) / t``, the sampler's noise, ids,
    schedule, unpacking and decoding must give that image back (to the pixel rounding)."""
    from plait.config import JobConfig
    from plait_flux.config import FluxConfig
    from plait_flux.embedded import ShapesDataset
    from plait_flux.sampling import FluxSampler
    from plait_flux.spec import FLAVORS

    config = JobConfig()
    config.flux = FluxConfig(image_size=8, sample_steps=5, sample_cfg_scale=1.0)
    sampler = FluxSampler(config, FLAVORS["flux-debug-tiny"], torch.device("cpu"))
    image, caption = ShapesDataset(size=4, image_size=8)[1]
    x0 = sampler.encoders.encode_image(image)[None]

    class ExactVelocity(torch.nn.Module):
        def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None):
            assert img.shape[1] == img_ids.shape[1] == 4 and txt.shape[1] == txt_ids.shape[1]
            return (img - x0) / timesteps.view(-1, 1, 1)

    drawn = sampler.run(ExactVelocity(), [caption])[0].image
    expected = ((image + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
    assert drawn.shape == (8, 8, 3) and drawn.dtype == torch.uint8
    assert (drawn.int() - expected.int()).abs().max() <= 1
