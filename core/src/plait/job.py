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
from plait.train_state import CombinedNeeds, RunNeeds

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

    @property
    def hook(self) -> Any:
        return self.plugins.hook

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step over all data-parallel ranks."""
        training = self.config.training
        return (self.grad_accumulation_steps * training.local_batch_size * training.seq_len
                * self.parallel_dims.dp_degree)

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
                                 sequence_group=None if cp_mesh is None else cp_mesh.get_group())
            hook.plait_apply_tensor_parallel(model=part, **common)
            hook.plait_apply_expert_parallel(model=part, **common)
            hook.plait_apply_context_parallel(model=part, **common)
            apply_activation_checkpointing(part, config.activation_checkpoint, spec.block_container)
            apply_compile(part, config.compile, spec.block_container, fullgraph=self.needs.compile_fullgraph)
            hook.plait_apply_data_parallel(model=part, **common)
        return parts, pipeline


def resolve_job(config: JobConfig, plugins: PluginManager, spec: ModelSpec, world_size: int) -> Job:
    """Every check that can run before any work, once; the resolved run."""
    config.validate()
    if config.compile.enable:
        check_compile_backend(config.compile.backend)
    parallel_dims = ParallelDims.from_config(config.parallelism, world_size)
    check_capabilities(parallel_dims, plugins)
    return resolve_with_plugins(config, plugins, spec, parallel_dims)


def resolve_with_plugins(config: JobConfig, plugins: PluginManager, spec: ModelSpec,
                         parallel_dims: ParallelDims) -> Job:
    """The plugins' part of ``resolve_job``: the model args of this run, the declared needs,
    every ``plait_validate``, then the sequence length the needs imply."""
    declared_model_args = resolve_model_args(spec, config)
    model_args = spec.follow_seq_len(declared_model_args, config.training.seq_len)
    needs = RunNeeds.combine(
        [need for need in plugins.hook.plait_run_needs(config=config, parallel_dims=parallel_dims, model_spec=spec)
         if need is not None]
    )
    job = Job(
        config=config,
        plugins=plugins,
        spec=spec,
        model_args=model_args,
        declared_model_args=declared_model_args,
        parallel_dims=parallel_dims,
        grad_accumulation_steps=grad_accumulation_steps(config, parallel_dims),
        needs=needs,
    )
    plugins.hook.plait_validate(config=config, parallel_dims=parallel_dims, model_spec=spec, job=job)
    check_sequence_length(config.training.seq_len, needs)
    return job


#: The flavor a model trains when neither --model.flavor nor --model.hf_dir says otherwise.
DEFAULT_FLAVOR = "debugmodel"


def resolve_model_args(spec: ModelSpec, config: JobConfig) -> Any:
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
    return replace_args(args, model.args)


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
    from plait.hf import read_hf_config

    if spec.hf_adapter is None:
        raise ConfigError(f"model {spec.name!r} has no Hugging Face adapter; drop --model.hf_dir")
    hf_config = read_hf_config(hf_dir)
    architectures = hf_config.get("architectures") or []
    if architectures and not set(architectures) & set(spec.hf_adapter.hf_architectures):
        raise ConfigError(
            f"{hf_dir} holds a {', '.join(architectures)} checkpoint; model {spec.name!r} reads "
            f"{', '.join(spec.hf_adapter.hf_architectures)}"
        )
    try:
        return spec.hf_adapter.args_from_hf_config(hf_config)
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"{hf_dir}/config.json does not describe a {spec.name} model: {error!r}") from None


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
