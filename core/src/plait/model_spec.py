"""ModelSpec: everything a model tells the core and the plugins, so that no plugin knows
any model by name.

A model package registers one ``ModelSpec`` through ``plait_register_models``. The core
builds the model on the meta device with ``build(args)``, calls
``model.init_weights()`` after materializing it, and wraps ``model.<block_container>``
block by block (activation checkpointing, compile, FSDP). Parallelism plugins read the
plans declared here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.distributed.device_mesh import DeviceMesh


class HFAdapter(Protocol):
    """Converts between plait's and Hugging Face's names, configs and tensors. An adapter
    may set ``hf_weights_name`` (default ``"model"``: ``model.safetensors``) to the file
    stem its library reads, e.g. ``"diffusion_pytorch_model"`` for diffusers, and
    ``file_formats``: other layouts ``plait convert --format NAME`` writes as one
    safetensors file (name -> ``(state_dict, args) -> tensors``, e.g. flux's ``"bfl"``)."""

    #: HF ``architectures`` entries this adapter reads, e.g. ("LlamaForCausalLM",).
    hf_architectures: tuple[str, ...]

    def args_from_hf_config(self, hf_config: dict[str, Any]) -> Any:
        """Model args (the flavor dataclass) for an HF ``config.json`` dict."""

    def hf_config_from_args(self, args: Any) -> dict[str, Any]:
        """An HF ``config.json`` dict (including ``architectures`` and ``model_type``)."""

    def from_hf(self, hf_state_dict: dict[str, torch.Tensor], args: Any) -> dict[str, torch.Tensor]:
        """plait state dict from HF tensors (renames, permutations, dequantization)."""

    def to_hf(self, state_dict: dict[str, torch.Tensor], args: Any) -> dict[str, torch.Tensor]:
        """HF state dict from plait tensors; the exact inverse of ``from_hf``."""


#: Names of the tensor-parallel styles a plan may use; the tp plugin maps each to a
#: torch ``ParallelStyle``. Patterns use ``*`` for one path component ("layers.*.wq").
TPStyle = Literal[
    "colwise",  # shard output features; input replicated
    "rowwise",  # shard input features; output sequence-sharded (Shard(1)) when SP is on
    "embedding",  # vocab-parallel embedding, output sequence-sharded
    "output",  # column-parallel LM head, logits sharded on vocab (for loss parallel)
    "sequence_parallel",  # norms run on sequence shards
    "prepare_input",  # gather the sequence-sharded input before attention / FFN
    "replicate",  # parameters replicated, computed on replicated inputs (MLA's latent projections)
    "moe",  # a plait.nn.MoE layer: experts' hidden features sharded, input gathered, output summed
    "sum_gradient",  # identity whose input gradient is summed over the tp ranks
]

#: A module converted before sharding (``plait_convert_model``) may carry, under this
#: attribute, a mapping from plan style name (``"colwise"``, ``"rowwise"``,
#: ``"prepare_input"``) to the ``ParallelStyle`` class the tp plugin builds for it in place
#: of torch's, with the same arguments (float8 linears all-gather activations in float8).
TP_STYLE_CLASSES = "tp_style_classes"


@dataclass(kw_only=True, frozen=True)
class TPPlan:
    """A model's tensor-parallel plan: module path pattern -> style.

    ``divisible_by_tp`` names the model-args attributes that tp must divide (head
    counts, FFN width; dotted for nested ones, ``"moe.hidden_dim"``, skipped where a
    part is None); the tp plugin checks them and reports the first that fails.

    ``extra(model, tp_mesh)``, if set, runs after the styles are applied, for what no
    style covers (qwen3's per-head q/k norms): the model acts through its own spec, and
    no plugin asks for it by name. ``extra_covers`` names the modules (patterns) whose
    parameters ``extra`` distributes.

    Every parameter of the model must be covered (by its module's style, a ``moe`` style
    on a module above it, or ``extra_covers``); a parameter every rank keeps whole is
    covered with the ``replicate`` style. The tp plugin checks this before any work.

    ``sequence_parallel`` False: the plan keeps the activations between blocks whole on
    every rank and has no sequence-parallel layout; the tp plugin refuses
    ``--tp.sequence_parallel True`` for it with a message.
    """

    styles: Mapping[str, TPStyle]
    divisible_by_tp: tuple[str, ...] = ()
    extra: Callable[[nn.Module, DeviceMesh], Any] | None = None
    extra_covers: tuple[str, ...] = ()
    sequence_parallel: bool = True


@dataclass(kw_only=True)
class ModelSpec:
    name: str
    #: flavor name -> model args (a dataclass owned by the model package)
    flavors: Mapping[str, Any]
    #: builds the module from model args on the current default device (meta during init)
    build: Callable[[Any], nn.Module]
    #: FLOPs per token of forward+backward for a sequence length (6N + attention)
    flops_per_token: Callable[[Any, int], float]
    #: attribute of the model holding its repeated blocks (an nn.ModuleDict or ModuleList)
    block_container: str = "layers"
    #: the model-args field that follows the run's ``--training.seq_len`` (e.g. the length of
    #: a RoPE table, ``"max_seq_len"``); None keeps the flavor's value whatever the run's length
    #: (a learned position table, whose shape is part of the weights)
    seq_len_arg: str | None = None
    #: the model-args field holding the vocabulary size (e.g. ``"vocab_size"``): trained from
    #: scratch it follows the tokenizer (padded to ``--model.vocab_multiple``); None: the
    #: model has no vocabulary, or keeps its flavor's
    vocab_arg: str | None = None
    tp_plan: TPPlan | None = None
    #: module paths that begin a new pipeline stage, given args and the number of stages
    pipeline_split_points: Callable[[Any, int], list[str]] | None = None
    #: attention implementation by name if it supports context parallelism, else None
    cp_attention: Literal["sdpa", "flex"] | None = None
    #: module paths (patterns, ``*`` = one path component) of the attention kernels that
    #: context parallelism wraps; each takes ``q, k, v`` as ``[batch, heads, seq, head_dim]``
    cp_attention_modules: tuple[str, ...] = ()
    #: buffers indexed by sequence position (attribute path -> sequence dim), e.g. a RoPE
    #: table; context parallelism gives each rank the rows of its own positions (and
    #: rebuilds a flex ``BlockMask`` attribute named here for them)
    cp_sequence_buffers: Mapping[str, int] = field(default_factory=dict)
    #: with a ``data_pipeline``: the named inputs indexed by sequence position (name ->
    #: sequence dim, e.g. ``{"img": 1, "img_ids": 1}``), which context parallelism shards
    #: like a language model's tokens, each in ``2 × cp`` chunks, with the labels on dim 1;
    #: inputs not named here (per-sample ones) reach every rank whole. The model's attention
    #: must be unmasked (bidirectional) and its positions come from its inputs (no
    #: ``cp_sequence_buffers``). Empty: context parallelism refuses such a model
    cp_sequence_inputs: Mapping[str, int] = field(default_factory=dict)
    #: parameters indexed by sequence position (patterns of parameter paths, e.g. a learned
    #: position table ``"pos_embedding.weight"``): plugins that shard activations along the
    #: sequence (tp's sequence parallelism, context parallelism) refuse such a model
    sequence_indexed_parameters: tuple[str, ...] = ()
    #: module paths (patterns) that are MoE expert groups, for the ep plugin
    expert_modules: tuple[str, ...] = ()
    hf_adapter: HFAdapter | None = None
    #: loss(outputs, labels) -> scalar mean loss; None means token cross-entropy
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None
    #: a model's own data pipeline, built instead of the token loader (``DataRequest`` ->
    #: ``DataPipeline``, ``plait.data.batch``): it yields ``(TensorBatch, labels)`` and the
    #: model is called as ``model(**inputs)``. Pipeline stages refuse such a model
    #: (``token_inputs``); context parallelism needs its ``cp_sequence_inputs``.
    data_pipeline: Callable[[Any], Any] | None = None
    #: with a ``data_pipeline``: positions the model processes per sample for a run
    #: (``(config, model_args) -> int``), the "tokens" of throughput and of
    #: ``flops_per_token``; a token model's is ``--training.seq_len``
    tokens_per_sample: Callable[[Any, Any], int] | None = None
    #: ``plait preprocess OUTPUT``: ``(job, output_folder) -> summary line`` runs the work
    #: that need not repeat every step (frozen encoders, say) once over the run's dataset
    #: and writes what the ``data_pipeline`` reads when ``--data.dataset`` names the folder
    preprocess: Callable[[Any, str], str] | None = None
    #: a model's own samples during training (``--training.sample_interval``):
    #: ``(config, model_args, device) -> plait.training_samples.Sampler``, which makes a
    #: ``Sample`` (text and/or image) of each ``--training.sample_prompts`` prompt; None:
    #: greedy continuations of a language model
    sampler: Callable[[Any, Any, Any], Any] | None = None
    #: plugin that registered the spec; filled in by the plugin manager
    provided_by: str = field(default="", compare=False)

    @property
    def token_inputs(self) -> bool:
        """Whether the model trains on token sequences ``[batch, seq]`` from the core's
        loader (a language model), rather than on its own pipeline's named inputs."""
        return self.data_pipeline is None

    def sample_tokens(self, config: Any, args: Any) -> int:
        """Positions processed per sample in a run: ``tokens_per_sample`` or the sequence length."""
        if self.data_pipeline is not None and self.tokens_per_sample is not None:
            return int(self.tokens_per_sample(config, args))
        return config.training.seq_len

    def args_for(self, flavor: str) -> Any:
        from plait.errors import ConfigError

        if flavor not in self.flavors:
            raise ConfigError(
                f"model {self.name!r} has no flavor {flavor!r}; choose one of: "
                + ", ".join(sorted(self.flavors))
            )
        return self.flavors[flavor]

    def args_for_run(self, flavor: str, seq_len: int) -> Any:
        """The flavor's args, with ``seq_len_arg`` (if declared) set to the run's sequence length."""
        return self.follow_seq_len(self.args_for(flavor), seq_len)

    def follow_seq_len(self, args: Any, seq_len: int) -> Any:
        """``args`` with ``seq_len_arg`` (if declared) set to ``seq_len``."""
        import dataclasses

        from plait.errors import ConfigError

        if self.seq_len_arg is None:
            return args
        if not (dataclasses.is_dataclass(args) and self.seq_len_arg in {f.name for f in dataclasses.fields(args)}):
            raise ConfigError(
                f"model {self.name!r} declares seq_len_arg={self.seq_len_arg!r}, but its args "
                f"({type(args).__name__}) have no such dataclass field; fix the model spec"
            )
        return dataclasses.replace(args, **{self.seq_len_arg: seq_len})

    def build_meta(self, args: Any) -> nn.Module:
        """The model on the meta device: structure and shapes, no memory."""
        from plait.meta_init import on_meta

        with on_meta():
            return self.build(args)

    def build_initialized(self, args: Any, *, device: str | torch.device = "cpu") -> nn.Module:
        """The model materialized on ``device`` and initialized by its ``init_weights``
        (which also fills buffers no checkpoint holds, such as RoPE tables), leaving the
        caller's RNG stream where it was."""
        import torch

        from plait.meta_init import materialize

        model = materialize(self.build_meta(args), device)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.init_weights()
        return model


def even_split_points(model: str, n_layers: int, num_stages: int, *, container: str = "layers",
                      tied_embeddings: bool = False) -> list[str]:
    """Pipeline split points for ``n_layers`` blocks ``<container>.0 ..`` in ``num_stages``
    stages: the first block of every stage after the first; earlier stages take one extra
    block when the layers do not divide evenly. ``model`` names the model in errors."""
    from plait.errors import ConfigError

    if num_stages < 1:
        raise ConfigError(f"{model}: the number of pipeline stages must be positive, got {num_stages}")
    if num_stages > n_layers:
        raise ConfigError(
            f"{model}: cannot split {n_layers} layers into {num_stages} pipeline stages; "
            f"use at most {n_layers} stages (--parallelism.pp and stages per rank) or a larger flavor"
        )
    if num_stages > 1 and tied_embeddings:
        raise ConfigError(
            f"{model}: a model with tied embeddings (tie_word_embeddings) cannot be pipelined: the "
            "embedding and the LM head would live on different stages; use --parallelism.pp 1"
        )
    base, extra = divmod(n_layers, num_stages)
    points, start = [], 0
    for stage in range(num_stages - 1):
        start += base + (1 if stage < extra else 0)
        points.append(f"{container}.{start}")
    return points


def module_path_matches(pattern: str, path: str) -> bool:
    """Whether a spec pattern names the dotted module path ``path``: the same number of
    components, each matched as a shell pattern (``*`` = any one component)."""
    from fnmatch import fnmatchcase

    pattern_parts, path_parts = pattern.split("."), path.split(".")
    return len(pattern_parts) == len(path_parts) and all(
        fnmatchcase(part, wanted) for part, wanted in zip(path_parts, pattern_parts)
    )


def dotted_attribute(args: Any, dotted_name: str) -> Any:
    """``args.moe.hidden_dim`` for ``"moe.hidden_dim"``; None where a part is None (a dense flavor)."""
    value = args
    for part in dotted_name.split("."):
        if value is None:
            return None
        value = getattr(value, part)
    return value
