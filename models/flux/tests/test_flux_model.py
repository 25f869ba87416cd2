"""The FLUX.1 transformer: published sizes, the forward contract, FLOPs, initialization."""
import pytest
import torch

from plait_flux.flow import image_ids, text_ids
from plait_flux.model import Flux, count_parameters
from plait_flux.spec import FLAVORS, flops_per_token, flux_spec

SPEC = flux_spec()


@pytest.mark.parametrize("flavor, billions", [("flux-dev", 11.90), ("flux-schnell", 11.89)])
def test_published_flavors_have_their_size_on_meta(flavor, billions):
    args = SPEC.args_for(flavor)
    model = SPEC.build_meta(args)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == count_parameters(args)
    assert round(n_params / 1e9, 2) == billions
    assert (args.hidden_size, args.num_heads, args.depth, args.depth_single_blocks) == (3072, 24, 19, 38)
    assert (args.context_in_dim, args.vec_in_dim, tuple(args.axes_dim)) == (4096, 768, (16, 56, 56))
    assert args.guidance_embed == (flavor == "flux-dev")


@pytest.mark.parametrize("flavor", sorted(FLAVORS))
def test_every_flavor_counts_its_parameters(flavor):
    args = FLAVORS[flavor]
    assert sum(p.numel() for p in SPEC.build_meta(args).parameters()) == count_parameters(args)


def inputs(args, *, batch=2, side=8, n_txt=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_img = (side // 2) ** 2
    return dict(
        img=torch.randn(batch, n_img, args.in_channels, generator=g),
        img_ids=image_ids(side, side), txt=torch.randn(batch, n_txt, args.context_in_dim, generator=g),
        txt_ids=text_ids(n_txt), timesteps=torch.rand(batch, generator=g), y=torch.randn(batch, args.vec_in_dim, generator=g),
        guidance=torch.full((batch,), 3.5) if args.guidance_embed else None,
    )


@pytest.fixture(scope="module")
def tiny():
    args = FLAVORS["flux-debug-tiny-guidance"]
    return args, SPEC.build_initialized(args)


def test_forward_contract_and_ids_with_or_without_batch(tiny):
    args, model = tiny
    x = inputs(args)
    out = model(**x)
    assert out.shape == (2, 16, args.out_channels)
    batched = dict(x, img_ids=x["img_ids"].expand(2, -1, -1), txt_ids=x["txt_ids"].expand(2, -1, -1))
    torch.testing.assert_close(model(**batched), out, rtol=0, atol=0)
    mixed = dict(x, img_ids=x["img_ids"].expand(2, -1, -1))
    torch.testing.assert_close(model(**mixed), out, rtol=0, atol=0)


def test_guidance_flavor_needs_guidance_and_it_matters(tiny):
    args, model = tiny
    x = inputs(args)
    with pytest.raises(ValueError, match="pass guidance"):
        model(**dict(x, guidance=None))
    assert not torch.allclose(model(**dict(x, guidance=torch.full((2,), 1.0))), model(**x))


def test_image_tokens_see_each_other_and_the_text(tiny):
    """Attention is bidirectional: changing the last text token or image token changes every output."""
    args, model = tiny
    x = inputs(args)
    out = model(**x)
    for name in ("txt", "img"):
        changed = x[name].clone()
        changed[:, -1] += 1
        assert (model(**dict(x, **{name: changed})) - out).abs().amax(dim=-1).min() > 0, name


def test_init_weights_is_deterministic_and_sets_everything():
    args = FLAVORS["flux-debug-tiny"]
    torch.manual_seed(3)
    first = SPEC.build_initialized(args).state_dict()
    torch.manual_seed(3)
    poisoned = SPEC.build_meta(args)
    poisoned.to_empty(device="cpu")
    for t in poisoned.state_dict().values():
        t.fill_(float("nan"))
    with torch.no_grad():
        poisoned.init_weights()
    for name, tensor in poisoned.state_dict().items():
        assert torch.isfinite(tensor).all(), name
        torch.testing.assert_close(tensor, first[name], rtol=0, atol=0)


def test_flops_per_token_is_three_forwards():
    from torch.utils.flop_counter import FlopCounterMode

    args = FLAVORS["flux-debug"]
    model = SPEC.build_initialized(args)
    x = inputs(args, batch=1, side=16, n_txt=16)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**x)
    tokens = 64 + 16
    # the per-sample modulation matmuls are left out of the per-token count: within 10 %
    assert flops_per_token(args, tokens) * tokens == pytest.approx(3 * counter.get_total_flops(), rel=0.1)
