"""The conformance suite of plait model packages (``plait.testing.model_conformance``) on deepseek_v3."""
from __future__ import annotations

import dataclasses

import torch

from plait.testing import model_conformance, randomize_parameters
from plait_deepseek_v3.model import count_parameters
from plait_deepseek_v3.spec import FLAVORS, deepseek_v3_spec

DEBUG = FLAVORS["debugmodel"]
#: narrower than the debug flavor, YaRN active (max_seq_len above original_seq_len)
TINY = dataclasses.replace(
    DEBUG, dim=64, n_heads=4, vocab_size=96, inter_dim=96, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=12, max_seq_len=64, original_seq_len=16, rope_factor=4.0, mscale=0.8,
    moe=dataclasses.replace(DEBUG.moe, hidden_dim=32, route_scale=2.5),
)  # fmt: skip



def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights, and expert biases that load balancing has moved (HF stores them as
    ``e_score_correction_bias``; they change which experts are chosen)."""
    randomize_parameters(model, seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("expert_bias"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))


TestDeepseekV3Conformance = model_conformance(
    deepseek_v3_spec(),
    tiny={"plain-query": TINY, "low-rank-query": dataclasses.replace(TINY, q_lora_rank=24)},
    published={"671B": 671.0, "16B": 15.7},
    count_parameters=count_parameters,
    randomize=_randomize,
)
