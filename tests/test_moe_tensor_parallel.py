"""Mixture-of-experts models under tensor parallelism combined with FSDP and with expert
parallelism (gloo ranks) train like one process.

- FSDP 2 × TP 2: every expert's hidden features split over the tp ranks, everything
  sharded over dp_shard; TP 2 with compiled blocks;
- EP 2 × TP 2 on 2 ranks: expert parallelism borrows the tp ranks; each tp rank sends
  its half of the (identically routed) tokens through the all-to-all;
- EP 4 × TP 2 × FSDP 2 on 4 ranks: the ep group spans dp_shard × tp.
"""
from __future__ import annotations

import pytest

from parity_helpers import max_differences, parity_job, train_in_this_process
from plait.testing import run_ranks

pytest.importorskip("plait_fsdp")
pytest.importorskip("plait_tp")
pytest.importorskip("plait_ep")

STEPS = 5
TOLERANCE = 1e-5
GLOBAL_BATCH = 4
RECIPES = {"qwen3": "qwen3_moe_debugmodel", "deepseek_v3": "deepseek_v3_debugmodel"}
SEQUENCE_WISE = ["--moe.aux_loss_type", "sequence"]  # the same mean however the batch is split


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    cache: dict[str, dict] = {}

    def reference(model: str) -> dict:
        if model not in cache:
            argv = parity_job(tmp_path_factory.mktemp(model), RECIPES[model], *SEQUENCE_WISE,
                              local_batch_size=GLOBAL_BATCH, steps=STEPS)
            cache[model] = train_in_this_process(argv)
        return cache[model]

    return reference


@pytest.mark.parametrize(
    ("model", "ranks", "layout"),
    [
        pytest.param("qwen3", 4, ["--plugins", "fsdp,tp", "--parallelism.dp_shard", "2", "--parallelism.tp", "2"],
                     id="qwen3-fsdp2-tp2"),
        pytest.param("qwen3", 2, ["--plugins", "tp", "--parallelism.dp_shard", "1", "--parallelism.tp", "2",
                                  "--compile.enable", "True", "--job.pg_timeout_seconds", "180"],
                     id="qwen3-tp2-compiled"),
        pytest.param("qwen3", 2, ["--plugins", "ep,fsdp,tp", "--parallelism.dp_shard", "1", "--parallelism.tp", "2",
                                  "--parallelism.ep", "2"], id="qwen3-ep2-tp2"),
        pytest.param("qwen3", 4, ["--plugins", "ep,fsdp,tp", "--parallelism.dp_shard", "2", "--parallelism.tp", "2",
                                  "--parallelism.ep", "4"], id="qwen3-ep4-fsdp2-tp2"),
        pytest.param("deepseek_v3", 2, ["--plugins", "ep,fsdp,tp", "--parallelism.dp_shard", "1",
                                        "--parallelism.tp", "2", "--parallelism.ep", "2"], id="deepseek_v3-ep2-tp2"),
    ],
)  # fmt: skip
def test_layout_matches_one_process(tmp_path, references, model, ranks, layout):
    data_parallel = ranks // 2  # tp 2 in every layout
    argv = parity_job(tmp_path, RECIPES[model], *SEQUENCE_WISE, *layout,
                      local_batch_size=GLOBAL_BATCH // data_parallel, steps=STEPS)
    run = run_ranks(ranks, argv, tmp_path / "result.json")
    loss_diff, norm_diff = max_differences(run, references(model))
    assert loss_diff < TOLERANCE and norm_diff < TOLERANCE, (loss_diff, norm_diff, run)
