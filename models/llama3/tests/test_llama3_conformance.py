"""The conformance suite of plait model packages (``plait.testing.model_conformance``) on llama3."""
from __future__ import annotations

import dataclasses

from plait.testing import model_conformance
from plait_llama3.model import count_parameters
from plait_llama3.spec import FLAVORS, llama3_spec

TINY = FLAVORS["debugmodel_tiny"]

TestLlama3Conformance = model_conformance(
    llama3_spec(),
    tiny={
        "gqa": dataclasses.replace(TINY, n_layers=3, vocab_size=96, max_seq_len=64),
        "tied-scaled-rope": dataclasses.replace(TINY, vocab_size=96, max_seq_len=64, tie_word_embeddings=True,
                                                use_rope_scaling=True, rope_original_max_position_embeddings=16),
    },
    published={"8B": 8.03, "70B": 70.55, "405B": 405.85},
    published_tolerance=0.01,
    count_parameters=count_parameters,
)
