"""The conformance suite of plait model packages (``plait.testing.model_conformance``) on qwen3."""
from __future__ import annotations

import dataclasses

from plait.nn import MoEArgs
from plait.testing import model_conformance
from plait_qwen3.model import ModelArgs, count_parameters
from plait_qwen3.spec import qwen3_spec

DENSE = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=24, vocab_size=96, ffn_hidden_dim=96,
                  max_seq_len=64)  # fmt: skip  (query width 96 differs from dim, as in Qwen3)

TestQwen3Conformance = model_conformance(
    qwen3_spec(),
    tiny={
        "dense": DENSE,
        "dense-tied-mha": dataclasses.replace(DENSE, n_kv_heads=4, tie_word_embeddings=True),
        "moe": dataclasses.replace(DENSE, moe=MoEArgs(num_experts=6, top_k=2, hidden_dim=32, normalize_weights=True)),
    },
    published={"0.6B": 0.6, "1.7B": 1.7, "4B": 4.0, "8B": 8.2, "14B": 14.8, "32B": 32.8, "30B-A3B": 30.5,
               "235B-A22B": 235.1},  # fmt: skip
    count_parameters=count_parameters,
)
