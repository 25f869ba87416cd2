"""A run resolved once: ``resolve_job`` runs every check that can run before any work and
returns the ``Job`` record that the trainer, ``plait plan`` and the plugins' validators take.

Resolution order: the config sections validate themselves; the model args of this run
(the spec's ``seq_len_arg`` follows --training.seq_len); the parallel degrees against the
world size; a plugin for every degree > 1; gradient accumulation; the plugins' declared
needs (``plait_run_needs``); every plugin's ``plait_validate``; the sequence length the needs
imply.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from plait.config import JobConfig
from plait.errors import ConfigError
from plait.model_spec import ModelSpec
from plait.parallel_dims import DEGREE_NAMES, ParallelDims
from plait.train_state import CombinedNeeds, DeviceInfo, RunNeeds

if TYPE_CHECKING:
    import torch
    from torch import nn

    from plait.plugins import PluginManager
    from plait.train_state import PipelineResult


@dataclass(kw_only=True, eq=False)
class Job:
    config: JobConfig
    plugins: PluginManager
    spec: ModelSpec
    model_args: Any
    """The model args of this run (``seq_len_arg`` follows --training.seq_len)."""
    declared_model_args: Any
    """The same before the run's sequence length applies: the model as a checkpoint or an
    export describes it (e.g. its full RoPE context)."""
    parallel_dims: ParallelDims
    grad_accumulation_steps: int
    needs: CombinedNeeds
    """What the enabled plugins declared for this run, combined."""
    device: DeviceInfo
    """The device this run trains on (hook ``plait_device``), with its capabilities."""
    tokenizer: Any = None
    """The run's tokenizer, built once while resolving (None where the model reads no token
    ids): the vocabulary follows it and the trainer's token loader reads with it."""

    @property
    def hook(self) -> Any:
        return self.plugins.hook

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step over all data-parallel ranks."""
        training = self.config.training
        return (self.grad_accumulation_steps * training.local_batch_size * self.tokens_per_sample
                * self.parallel_dims.dp_degree)

    @property
    def tokens_per_sample(self) -> int:
        """Positions the model processes per sample (--training.seq_len for a token model)."""
        return self.spec.sample_tokens(self.config, self.model_args)

    @functools.cached_property
    def meta_model(self) -> nn.Module:
        """The whole model of this run on the meta device, built once for checks that read
        its structure (module paths, expert counts). Read it; never modify it."""
        return self.spec.build_meta(self.model_args)

    def build_model_parts(self, device: torch.device) -> tuple[list[nn.Module], PipelineResult | None]:
        """This rank's model chunks on the meta device, converted, split and parallelized in
        the fixed hook order (convert -> pipeline split -> per chunk: TP -> EP -> CP -> AC ->
        compile -> DP). The trainer materializes them; ``plait plan`` measures them."""
        from plait.nn.moe import configure_moe_layers
        from plait.parallelize import apply_activation_checkpointing, apply_compile

        config, spec, pd, hook = self.config, self.spec, self.parallel_dims, self.hook
        model = spec.build_meta(self.model_args)
        hook.plait_convert_model(model=model, config=config, model_spec=spec)
        pipeline = hook.plait_pipeline_split(
            model=model, config=config, parallel_dims=pd, model_spec=spec, device=device, job=self
        )
        parts = pipeline.model_parts if pipeline is not None else [model]
        common = dict(config=config, parallel_dims=pd, model_spec=spec)
        dispatcher = hook.plait_token_dispatcher(config=config, parallel_dims=pd)
        cp_mesh = pd.get_optional_mesh("cp")
        for part in parts:
            configure_moe_layers(part, aux_loss_coeff=config.moe.aux_loss_coeff, aux_loss_type=config.moe.aux_loss_type,
                                 grad_accumulation_steps=self.grad_accumulation_steps, dispatcher=dispatcher,
                                 sequence_group=None if cp_mesh is None else cp_mesh.get_group(),
                                 grouped_mm=self.device.capabilities.grouped_mm,
                                 group_alignment=self.needs.moe_group_alignment)
            hook.plait_apply_tensor_parallel(model=part, **common)
            hook.plait_apply_expert_parallel(model=part, **common)
            hook.plait_apply_context_parallel(model=part, **common)
            apply_activation_checkpointing(part, config.activation_checkpoint, spec.block_container)
            apply_compile(part, config.compile, spec.block_container, fullgraph=self.needs.compile_fullgraph)
            hook.plait_apply_data_parallel(model=part, **common)
        return parts, pipeline


def resolve_job(config: JobConfig, plugins: PluginManager, spec: ModelSpec, world_size: int,
                device: DeviceInfo | None = None) -> Job:
    """Every check that can run before any work, once; the resolved run. ``device``: the
    device to check against (tests); by default the ``plait_device`` hook's answer."""
    config.validate()
    if config.compile.enable:
        check_compile_backend(config.compile.backend)
    parallel_dims = ParallelDims.from_config(config.parallelism, world_size)
    check_capabilities(parallel_dims, plugins)
    return resolve_with_plugins(config, plugins, spec, parallel_dims, device=device)


def resolve_with_plugins(config: JobConfig, plugins: PluginManager, spec: ModelSpec,
                         parallel_dims: ParallelDims, device: DeviceInfo | None = None) -> Job:
    """The plugins' part of ``resolve_job``: the model args of this run, the device, the
    declared needs and the device capabilities they require, every ``plait_validate``,
    then the sequence length the needs imply."""
    from plait.capabilities import check_requirements

    tokenizer = run_tokenizer(spec, config)
    declared_model_args = resolve_model_args(spec, config, tokenizer=tokenizer)
    model_args = spec.follow_seq_len(declared_model_args, config.training.seq_len)
    if device is None:
        device = plugins.hook.plait_device(config=config)
    needs_by_plugin = [(name, need) for name, need in plugins.results_by_plugin(
        "plait_run_needs", config=config, parallel_dims=parallel_dims, model_spec=spec) if need is not None]
    check_requirements(device, [(name, need.requires, need.requires_fix) for name, need in needs_by_plugin])
    needs = RunNeeds.combine([need for _, need in needs_by_plugin])
    parallel_dims.replica_groups, parallel_dims.replica_group = needs.replica_groups, needs.replica_group
    place_job_outputs(config, needs)
    job = Job(
        config=config,
        plugins=plugins,
        spec=spec,
        model_args=model_args,
        declared_model_args=declared_model_args,
        parallel_dims=parallel_dims,
        grad_accumulation_steps=grad_accumulation_steps(config, parallel_dims),
        needs=needs,
        device=device,
        tokenizer=tokenizer,
    )
    plugins.hook.plait_validate(config=config, parallel_dims=parallel_dims, model_spec=spec, job=job)
    check_sequence_length(config.training.seq_len, needs)
    return job


def place_job_outputs(config: JobConfig, needs: CombinedNeeds) -> None:
    """A job that shares its dump folder with the other jobs of a run (``needs.job_folder``)
    writes its outputs to ``<dump_folder>/<job_folder>``; the run's checkpoint folder stays
    ``<dump_folder>/<checkpoint.folder>`` (made absolute, so that it no longer follows the
    dump folder). A config saved by such a job (already placed) is left as it is."""
    import os

    dump = config.job.dump_folder
    if not needs.job_folder or os.path.basename(os.path.normpath(dump)) == needs.job_folder:
        return
    config.checkpoint.folder = os.path.join(os.path.abspath(dump), config.checkpoint.folder)
    config.job.dump_folder = os.path.join(dump, needs.job_folder)


#: The flavor a model trains when neither --model.flavor nor --model.hf_dir says otherwise.
DEFAULT_FLAVOR = "debugmodel"


def run_tokenizer(spec: ModelSpec, config: JobConfig) -> Any:
    """The tokenizer of --data.tokenizer for a model that reads token ids, else None."""
    if not spec.token_inputs:
        return None
    from plait.data import build_tokenizer

    return build_tokenizer(config.data.tokenizer, bos_token=config.data.bos_token, eos_token=config.data.eos_token)


def resolve_model_args(spec: ModelSpec, config: JobConfig, *, tokenizer: Any = None) -> Any:
    """The model args the run declares: the shape of ``--model.hf_dir``'s checkpoint (which
    a ``--model.flavor`` must then agree with) or of the flavor, with ``--model.args``
    overrides on top. Without either, the flavor is ``debugmodel`` where the model has one."""
    from plait.model_args import replace_args

    model, seq_len = config.model, config.training.seq_len
    if model.hf_dir:
        args = hf_model_args(spec, model.hf_dir)
        if model.flavor:
            _check_flavor_matches(spec, model.flavor, args, model.hf_dir, seq_len)
    else:
        if not model.flavor:
            if DEFAULT_FLAVOR not in spec.flavors:
                raise ConfigError(
                    f"model {spec.name!r} needs a shape: choose --model.flavor (one of "
                    f"{', '.join(sorted(spec.flavors))}) or start from a checkpoint with --model.hf_dir"
                )
            model.flavor = DEFAULT_FLAVOR
        args = spec.args_for(model.flavor)
    if model.args:
        args = replace_args(args, model.args)
        _check_buildable(spec, args, model.args)
    return _with_tokenizer_vocabulary(
        spec, config, args, tokenizer if tokenizer is not None else run_tokenizer(spec, config))


def padded_vocabulary(tokens: int, multiple: int) -> int:
    return -(-tokens // multiple) * multiple


def _with_tokenizer_vocabulary(spec: ModelSpec, config: JobConfig, args: Any, tokenizer: Any) -> Any:
    """Trained from scratch, the vocabulary is the tokenizer's, padded; a checkpoint's (or
    one set with --model.args) must hold the tokenizer's ids."""
    from plait.model_args import replace_args

    if tokenizer is None or spec.vocab_arg is None:
        return args
    model = config.model
    if not model.hf_dir and spec.vocab_arg not in model.args and model.vocab == "tokenizer":
        return replace_args(args, {spec.vocab_arg: padded_vocabulary(tokenizer.vocab_size, model.vocab_multiple)})
    vocab = getattr(args, spec.vocab_arg)
    if tokenizer.vocab_size > vocab:
        source = (f"--model.args.{spec.vocab_arg}" if spec.vocab_arg in model.args
                  else f"the checkpoint {model.hf_dir}" if model.hf_dir else f"the flavor {model.flavor}")
        raise ConfigError(
            f"the tokenizer {config.data.tokenizer or '(embedded)'} has {tokenizer.vocab_size:,} tokens, more than "
            f"the vocabulary of {vocab:,} that {source} gives model {spec.name!r}: its ids past {vocab - 1} would "
            f"have no embedding. Use the tokenizer the checkpoint was trained with (--data.tokenizer), or train "
            f"from scratch (without --model.hf_dir), where the vocabulary follows the tokenizer"
        )
    return args


def _check_buildable(spec: ModelSpec, args: Any, overrides: dict[str, Any]) -> None:
    """Overridden args build a model (on the meta device: nothing is allocated); a size of
    zero or below fails here with the overrides named, not deep in the model's code."""
    try:
        spec.build_meta(args)
    except (RuntimeError, ValueError, TypeError, ArithmeticError, AssertionError) as error:
        given = ", ".join(f"--model.args.{name} {value}" for name, value in overrides.items())
        raise ConfigError(f"the model {spec.name!r} cannot be built with {given} ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}); sizes and head counts must be "
                          "positive and fit together") from None


def _check_flavor_matches(spec: ModelSpec, flavor: str, checkpoint_args: Any, hf_dir: str, seq_len: int) -> None:
    """The flavor must build the checkpoint's tensors (the checkpoint's args, such as its
    RoPE base, are the ones used); otherwise name the differing fields."""
    from plait.model_args import differing_fields

    ours, theirs = spec.args_for_run(flavor, seq_len), spec.follow_seq_len(checkpoint_args, seq_len)

    def shapes(args: Any) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in spec.build_meta(args).state_dict().items()}

    if shapes(ours) == shapes(theirs):
        return
    listed = "; ".join(f"{name}: flavor {a!r}, checkpoint {b!r}" for name, a, b in differing_fields(ours, theirs)[:6])
    raise ConfigError(
        f"--model.flavor {flavor} does not match the checkpoint in {hf_dir} ({listed}). The checkpoint's "
        "config.json gives the shape: drop the flavor with --model.flavor ''"
    )


def hf_model_args(spec: ModelSpec, hf_dir: str) -> Any:
    """The model args that an HF folder's ``config.json`` describes."""
    from plait.hf import hf_model_args_of, read_hf_config

    if spec.hf_adapter is None:
        raise ConfigError(f"model {spec.name!r} has no Hugging Face adapter; drop --model.hf_dir")
    return hf_model_args_of(spec.hf_adapter, spec.name, read_hf_config(hf_dir), hf_dir)


def check_compile_backend(backend: str) -> None:
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ConfigError(f"--compile.backend {backend!r} is not a torch.compile backend; choose one of: "
                          f"{', '.join(sorted(known))}")


def grad_accumulation_steps(config: JobConfig, parallel_dims: ParallelDims) -> int:
    per_round = config.training.local_batch_size * parallel_dims.dp_degree
    global_batch = config.training.global_batch_size
    if global_batch == -1:
        return 1
    if global_batch % per_round:
        raise ConfigError(
            f"--training.global_batch_size {global_batch} must be a multiple of local_batch_size "
            f"{config.training.local_batch_size} × data-parallel degree {parallel_dims.dp_degree} "
            f"= {per_round}; e.g. use {max(per_round, global_batch // per_round * per_round)}"
        )
    return global_batch // per_round


def check_capabilities(parallel_dims: ParallelDims, plugins: PluginManager) -> None:
    """A degree > 1 needs an enabled plugin that provides it; say which one otherwise."""
    for degree_name in DEGREE_NAMES:
        degree = getattr(parallel_dims, degree_name)
        if degree <= 1 or plugins.provides(degree_name):
            continue
        candidates = plugins.providers_of(degree_name)
        if candidates:
            fix = f"add {candidates[0]} to --plugins (e.g. --plugins {candidates[0]})"
        else:
            fix = ("no installed plugin provides it: install one (docs/plugins.md lists plait's own, "
                   "one per degree), then add it to --plugins")
        raise ConfigError(
            f"--parallelism.{degree_name} {degree} needs a plugin that provides {degree_name!r}, "
            f"and none is enabled: {fix}"
        )


def check_sequence_length(seq_len: int, needs: CombinedNeeds) -> None:
    if seq_len % needs.sequence_splits == 0:
        return
    suggestion = max(needs.sequence_splits, seq_len // needs.sequence_splits * needs.sequence_splits)
    raise ConfigError(
        f"--training.seq_len {seq_len} must be a multiple of {needs.sequence_splits}: "
        f"{' and '.join(needs.split_reasons)} cut each sequence into equal parts; use e.g. "
        f"--training.seq_len {suggestion}"
    )
