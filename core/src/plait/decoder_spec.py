"""The ``ModelSpec`` of a pre-norm decoder built from ``plait.nn`` (``DecoderStack`` of
``PreNormBlock``), from a few declarations.

Such a model shares its layout, so the spec fields follow from it: the tensor-parallel
plan around the attention (embedding, norms, SwiGLU feed-forward, MoE layer, LM head),
the even pipeline split over ``layers``, context parallelism on
``layers.*.attention.sdpa`` with the ``rope_cache`` table, the experts of MoE layers,
the RoPE table that follows ``--training.seq_len`` (``max_seq_len``), and the FLOPs per
token (6 per weight a token uses, plus the attention scores). A model package declares
what differs::

    def mymodel_spec() -> ModelSpec:
        return decoder_spec(
            "mymodel",
            flavors=FLAVORS,
            build=Transformer,
            count_parameters=count_parameters,      # (args, *, include_embedding, active_only)
            attention_dims=lambda a: (a.n_heads, a.head_dim, a.head_dim),
            attention_tp={"wq": "colwise", "wk": "colwise", "wv": "colwise", "wo": "rowwise"},
            divisible_by_tp=("n_heads", "kv_heads", "ffn_dim"),
            hf_adapter=MyHFAdapter(),
        )

Model args must have ``n_layers`` (and may have ``tie_word_embeddings``). Any other
``ModelSpec`` field can be passed through and wins over the derived one.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from plait.model_spec import ModelSpec, TPPlan, TPStyle, even_split_points

#: (heads, query/key head width, value head width) of a model's attention, from its args
AttentionDims = Callable[[Any], "tuple[int, int, int]"]


def decoder_tp_plan(
    *, attention: Mapping[str, TPStyle], divisible_by_tp: tuple[str, ...], moe: bool = False,
    extra: Callable[..., Any] | None = None, extra_covers: tuple[str, ...] = (),
) -> TPPlan:  # fmt: skip
    """The TP plan of a ``DecoderStack``: ``attention`` maps the attention's own modules
    (relative to ``layers.*.attention``) to styles; the rest is the same for every such
    model (vocab-parallel embedding, sequence-parallel norms, column/row-parallel SwiGLU,
    the ``moe`` style on ``layers.*.moe`` when ``moe``, a vocab-sharded LM head)."""
    styles: dict[str, TPStyle] = {
        "tok_embeddings": "embedding",
        "norm": "sequence_parallel",
        "output": "output",
        "layers.*.attention_norm": "sequence_parallel",
        "layers.*.attention": "prepare_input",
        **{f"layers.*.attention.{path}": style for path, style in attention.items()},
        "layers.*.ffn_norm": "sequence_parallel",
        "layers.*.feed_forward": "prepare_input",
        "layers.*.feed_forward.w1": "colwise",
        "layers.*.feed_forward.w3": "colwise",
        "layers.*.feed_forward.w2": "rowwise",
    }
    if moe:
        styles["layers.*.moe"] = "moe"
    return TPPlan(styles=styles, divisible_by_tp=divisible_by_tp, extra=extra, extra_covers=extra_covers)


def decoder_flops(count_parameters: Callable[..., int], attention_dims: AttentionDims) -> Callable[[Any, int], float]:
    """``flops_per_token(args, seq_len)``: 6 per weight one token uses
    (``count_parameters(args, include_embedding=False, active_only=True)``: the LM head
    counts, the embedding does not, MoE layers count their active experts), plus the
    attention scores, ``6 * n_layers * heads * (qk_dim + v_dim) * seq_len`` (forward and
    backward of ``q k^T`` and ``softmax v``, counted over the whole square as SDPA computes it)."""

    def flops_per_token(args: Any, seq_len: int) -> float:
        weights = count_parameters(args, include_embedding=False, active_only=True)
        heads, qk_dim, v_dim = attention_dims(args)
        return float(6 * weights + 6 * args.n_layers * heads * (qk_dim + v_dim) * seq_len)

    return flops_per_token


def decoder_split_points(model: str, *, container: str = "layers") -> Callable[[Any, int], list[str]]:
    """``pipeline_split_points(args, num_stages)``: ``n_layers`` blocks in even stages
    (``plait.model_spec.even_split_points``); tied embeddings refuse to be pipelined."""

    def split_points(args: Any, num_stages: int) -> list[str]:
        tied = bool(getattr(args, "tie_word_embeddings", False))
        return even_split_points(model, args.n_layers, num_stages, container=container, tied_embeddings=tied)

    return split_points


def decoder_spec(
    name: str,
    *,
    flavors: Mapping[str, Any],
    build: Callable[[Any], Any],
    count_parameters: Callable[..., int],
    attention_dims: AttentionDims,
    attention_tp: Mapping[str, TPStyle],
    divisible_by_tp: tuple[str, ...],
    moe: bool = False,
    tp_extra: Callable[..., Any] | None = None,
    tp_extra_covers: tuple[str, ...] = (),
    context_parallel: bool = True,
    **fields: Any,
) -> ModelSpec:
    """The ``ModelSpec`` of a ``plait.nn.DecoderStack`` model.

    ``count_parameters(args, *, include_embedding, active_only)`` counts from the args;
    ``attention_dims(args)`` gives (heads, qk head width, v head width) for the FLOPs;
    ``attention_tp`` / ``divisible_by_tp`` / ``tp_extra`` / ``tp_extra_covers`` complete the TP plan
    (``decoder_tp_plan``); ``moe`` adds the MoE layer's TP style and expert modules;
    ``context_parallel=False`` declares that the attention cannot run context-parallel.
    ``fields`` are further ``ModelSpec`` fields (``hf_adapter``, ``loss_fn``, ...).
    """
    derived: dict[str, Any] = dict(
        name=name,
        flavors=flavors,
        build=build,
        flops_per_token=decoder_flops(count_parameters, attention_dims),
        block_container="layers",
        seq_len_arg="max_seq_len",
        vocab_arg="vocab_size",
        tp_plan=decoder_tp_plan(attention=attention_tp, divisible_by_tp=divisible_by_tp, moe=moe, extra=tp_extra,
                                extra_covers=tp_extra_covers),
        pipeline_split_points=decoder_split_points(name),
    )
    if context_parallel:
        derived.update(cp_attention="sdpa", cp_attention_modules=("layers.*.attention.sdpa",),
                       cp_sequence_buffers={"rope_cache": 0})  # fmt: skip
    if moe:
        derived["expert_modules"] = ("layers.*.moe.experts",)
    return ModelSpec(**{**derived, **fields})
