"""plait.decoder_spec: the ModelSpec of a DecoderStack model from a few declarations."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from plait.decoder_spec import decoder_spec
from plait.errors import ConfigError


@dataclass(frozen=True)
class Args:
    n_layers: int = 4
    n_heads: int = 2
    head_dim: int = 8
    max_seq_len: int = 16
    tie_word_embeddings: bool = False


def _count(args: Args, *, include_embedding: bool = True, active_only: bool = False) -> int:
    return 1000 + (0 if active_only else 500) + (100 if include_embedding else 0)


def _spec(**options):
    declarations = dict(
        flavors={"tiny": Args()}, build=lambda args: None, count_parameters=_count,
        attention_dims=lambda a: (a.n_heads, a.head_dim, a.head_dim // 2),
        attention_tp={"wq": "colwise", "wo": "rowwise"}, divisible_by_tp=("n_heads",),
    )  # fmt: skip
    return decoder_spec("toy", **{**declarations, **options})


def test_dense_spec_fields() -> None:
    spec = _spec()
    styles = spec.tp_plan.styles
    assert styles["layers.*.attention.wq"] == "colwise" and styles["layers.*.attention.wo"] == "rowwise"
    assert styles["tok_embeddings"] == "embedding" and styles["layers.*.feed_forward.w2"] == "rowwise"
    assert "layers.*.moe" not in styles and spec.expert_modules == ()
    assert spec.tp_plan.divisible_by_tp == ("n_heads",) and spec.tp_plan.extra is None
    assert (spec.cp_attention, spec.cp_attention_modules, dict(spec.cp_sequence_buffers)) == (
        "sdpa", ("layers.*.attention.sdpa",), {"rope_cache": 0})  # fmt: skip
    assert (spec.block_container, spec.seq_len_arg) == ("layers", "max_seq_len")
    assert spec.args_for_run("tiny", 64).max_seq_len == 64


def test_moe_context_parallel_and_overrides() -> None:
    def extra(model, mesh) -> None:  # noqa: ANN001
        pass

    spec = _spec(moe=True, context_parallel=False, tp_extra=extra, seq_len_arg=None)
    assert spec.tp_plan.styles["layers.*.moe"] == "moe" and spec.expert_modules == ("layers.*.moe.experts",)
    assert spec.tp_plan.extra is extra
    assert spec.cp_attention is None and spec.cp_attention_modules == () and not spec.cp_sequence_buffers
    assert spec.seq_len_arg is None  # a passed field wins over the derived one


def test_flops_per_token_is_six_per_active_weight_plus_attention_scores() -> None:
    flops = _spec().flops_per_token(Args(), 100)
    assert flops == 6 * 1000 + 6 * 4 * 2 * (8 + 4) * 100  # active weights without the embedding


def test_split_points_are_even_and_refuse_tied_embeddings() -> None:
    split = _spec().pipeline_split_points
    assert split(Args(), 1) == [] and split(Args(), 2) == ["layers.2"] and split(Args(n_layers=5), 2) == ["layers.3"]
    assert split(Args(n_layers=6), 4) == ["layers.2", "layers.4", "layers.5"]  # earlier stages take the extra blocks
    with pytest.raises(ConfigError, match="toy: cannot split 4 layers into 5 pipeline stages"):
        split(Args(), 5)
    with pytest.raises(ConfigError, match="must be positive"):
        split(Args(), 0)
    with pytest.raises(ConfigError, match="toy: a model with tied embeddings"):
        split(Args(tie_word_embeddings=True), 2)
