"""The flux ``ModelSpec``: flavors, FLOPs, and its own data pipeline and loss."""
from __future__ import annotations

from plait.model_spec import ModelSpec
from plait_flux.flow import flow_matching_loss
from plait_flux.hf import FluxDiffusersAdapter
from plait_flux.model import Flux, FluxArgs
from plait_flux.parallel import CP_SEQUENCE_INPUTS, TP_PLAN
from plait_flux.pipeline import FluxPipeline, tokens_per_sample
from plait_flux.preprocess import preprocess
from plait_flux.sampling import FluxSampler

_DEBUG = dict(in_channels=64, out_channels=64, mlp_ratio=4.0, theta=10_000, qkv_bias=True)

FLAVORS: dict[str, FluxArgs] = {
    # CPU sizes for the embedded shapes dataset (captions of the embedded word encoder).
    "flux-debug": FluxArgs(**_DEBUG, vec_in_dim=64, context_in_dim=128, hidden_size=128, num_heads=4,
                           depth=2, depth_single_blocks=4, axes_dim=(8, 12, 12), guidance_embed=False),
    "flux-debug-tiny": FluxArgs(**_DEBUG, vec_in_dim=16, context_in_dim=32, hidden_size=32, num_heads=2,
                                depth=1, depth_single_blocks=1, axes_dim=(4, 6, 6), guidance_embed=False),
    "flux-debug-tiny-guidance": FluxArgs(**_DEBUG, vec_in_dim=16, context_in_dim=32, hidden_size=32, num_heads=2,
                                         depth=1, depth_single_blocks=1, axes_dim=(4, 6, 6), guidance_embed=True),
    # The published FLUX.1 transformers.
    "flux-dev": FluxArgs(guidance_embed=True),
    "flux-schnell": FluxArgs(guidance_embed=False),
}


def per_token_parameters(args: FluxArgs) -> int:
    """Weights every token multiplies by: one stream's attention and MLP in each
    double-stream block, every single-stream block, and the image input and output
    projections (the modulations run once per sample, not per token)."""
    dim, mlp = args.hidden_size, args.mlp_hidden_dim
    double = 4 * dim * dim + 2 * dim * mlp
    single = dim * (3 * dim + mlp) + (dim + mlp) * dim
    return args.depth * double + args.depth_single_blocks * single + dim * (args.in_channels + args.out_channels)


def flops_per_token(args: FluxArgs, seq_len: int) -> float:
    """Forward + backward FLOPs per token of a sample of ``seq_len`` image + text tokens."""
    attention = 12 * args.n_blocks * args.hidden_size * seq_len
    return 6 * per_token_parameters(args) + attention


def flux_spec() -> ModelSpec:
    return ModelSpec(
        name="flux",
        flavors=FLAVORS,
        build=Flux,
        flops_per_token=flops_per_token,
        block_container="blocks",
        tp_plan=TP_PLAN,
        cp_attention="sdpa",
        cp_attention_modules=("blocks.*.attention",),
        cp_sequence_inputs=CP_SEQUENCE_INPUTS,
        loss_fn=flow_matching_loss,
        data_pipeline=FluxPipeline,
        tokens_per_sample=tokens_per_sample,
        hf_adapter=FluxDiffusersAdapter(),
        preprocess=preprocess,
        sampler=FluxSampler,
    )
