"""Checkpoint interop: diffusers' FluxTransformer2DModel and Black Forest Labs single
files, both directions, against diffusers' own forward on the same weights."""
import pytest
import torch

import plait
from plait.errors import CheckpointError, ConfigError
from plait.hf import load_hf_folder, save_hf_folder
from plait_flux.flow import image_ids, text_ids
from plait_flux.hf import FluxDiffusersAdapter, load_bfl_file, save_bfl_file
from plait_flux.spec import FLAVORS, flux_spec

diffusers = pytest.importorskip("diffusers")

ADAPTER = FluxDiffusersAdapter()


def tiny_diffusers(*, guidance: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6),
    )
    with torch.no_grad():  # every tensor random, norm scales and biases too: no entry can hide
        for parameter in model.parameters():
            parameter.normal_(std=0.2)
    return model.eval()


def inputs(args, *, seed=1, batch=2, side=8, n_txt=5):
    g = torch.Generator().manual_seed(seed)
    return dict(
        img=torch.randn(batch, (side // 2) ** 2, args.in_channels, generator=g), img_ids=image_ids(side, side),
        txt=torch.randn(batch, n_txt, args.context_in_dim, generator=g), txt_ids=text_ids(n_txt),
        timesteps=torch.rand(batch, generator=g), y=torch.randn(batch, args.vec_in_dim, generator=g),
        guidance=torch.tensor([3.5, 1.0]) if args.guidance_embed else None,
    )


@torch.no_grad()
def diffusers_forward(model, x):
    return model(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                 timestep=x["timesteps"], img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"],
                 return_dict=False)[0]


@pytest.mark.parametrize("guidance", [True, False], ids=["dev-like", "schnell-like"])
def test_diffusers_folder_loads_and_matches_diffusers(tmp_path, guidance):
    reference = tiny_diffusers(guidance=guidance)
    reference.save_pretrained(tmp_path / "hf")
    model = plait.from_pretrained("flux", tmp_path / "hf")
    args = model.args
    assert (args.depth, args.depth_single_blocks, args.hidden_size, args.guidance_embed) == (1, 2, 32, guidance)
    x = inputs(args)
    with torch.no_grad():
        ours = model(**x)
    torch.testing.assert_close(ours, diffusers_forward(reference, x), rtol=0, atol=1e-5)

    # back: exact inverse, and a folder diffusers loads with the same outputs
    _, hf_state = load_hf_folder(tmp_path / "hf")
    exported = ADAPTER.to_hf(model.state_dict(), args)
    assert exported.keys() == hf_state.keys()
    for name, tensor in hf_state.items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0, msg=name)
    save_hf_folder(tmp_path / "back", ADAPTER.hf_config_from_args(args), exported, max_shard_bytes=40_000,
                   weights_name=ADAPTER.hf_weights_name)
    assert (tmp_path / "back" / "diffusion_pytorch_model.safetensors.index.json").is_file()  # sharded
    reloaded = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "back").eval()
    torch.testing.assert_close(diffusers_forward(reloaded, x), ours, rtol=0, atol=1e-5)


def test_bfl_single_file_round_trip(tmp_path):
    """BFL names are plait's with the blocks numbered per kind (plait -> diffusers is
    checked through plait convert in test_flux_train)."""
    args = FLAVORS["flux-debug-tiny-guidance"]
    torch.manual_seed(0)
    state = flux_spec().build_initialized(args).state_dict()
    save_bfl_file(state, args, tmp_path / "flux1-tiny.safetensors")
    from safetensors.torch import load_file

    names = set(load_file(tmp_path / "flux1-tiny.safetensors"))
    assert {"double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight",
            "final_layer.adaLN_modulation.1.weight", "guidance_in.in_layer.weight"} <= names
    assert not any(name.startswith("blocks.") for name in names)
    back = load_bfl_file(tmp_path / "flux1-tiny.safetensors", args)
    assert back.keys() == state.keys()
    for name, tensor in state.items():
        torch.testing.assert_close(back[name], tensor, rtol=0, atol=0, msg=name)


def test_bad_checkpoints_are_messages(tmp_path):
    args = FLAVORS["flux-debug-tiny"]
    hf = ADAPTER.to_hf(flux_spec().build_initialized(args).state_dict(), args)
    hf.pop("single_transformer_blocks.0.proj_mlp.weight")
    with pytest.raises(CheckpointError, match="lacks 1 tensor.*proj_mlp"):
        ADAPTER.from_hf(hf, args)
    with pytest.raises(ConfigError, match="holds a diffusers AutoencoderKL"):
        ADAPTER.args_from_hf_config({"_class_name": "AutoencoderKL"})
    with pytest.raises(ConfigError, match="lacks num_layers"):
        ADAPTER.args_from_hf_config({"_class_name": "FluxTransformer2DModel"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_bfl_file(tmp_path / "nothing.safetensors", args)
    with pytest.raises(CheckpointError, match="does not use"):  # a dev file read as schnell
        save_bfl_file(flux_spec().build_initialized(FLAVORS["flux-debug-tiny-guidance"]).state_dict(),
                      FLAVORS["flux-debug-tiny-guidance"], tmp_path / "dev.safetensors")
        load_bfl_file(tmp_path / "dev.safetensors", args)
