"""The training loop. The same loop drives one CPU and every parallelism: plugins change
the model chunks, the meshes, the step's contexts and (for pipelines) forward/backward
through hooks, always in the fixed hook order (docs/plugins.md)."""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from plait.errors import ConfigError, DataError, PlaitError, TrainingDivergedError
from plait.job import Job
from plait.launch import check_memory_fits, is_out_of_memory, join_process_group, rank_from_env
from plait.meta_init import materialize
from plait.profiling import StepProfiler, StepTimes
from plait.step import compiled_loss, run_loss_fn
from plait.train_state import DeviceInfo, StepContext

logger = logging.getLogger("plait")


@dataclass
class TrainState:
    """Step counter, RNG and what model the run trains, checkpointed as plain JSON data."""

    step: int = 0
    tokens_seen: int = 0
    model: dict[str, Any] = field(default_factory=dict)
    """The model's name and declared args: a checkpoint of another model or shape is refused."""

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "rng": torch.get_rng_state(), "model": self.model}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("model")  # checkpoints before 2026-12 do not record it
        if saved and self.model and saved != self.model:
            raise ConfigError(_different_model(saved, self.model))
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        torch.set_rng_state(state["rng"])


def _different_model(saved: dict[str, Any], ours: dict[str, Any]) -> str:
    if saved.get("name") != ours.get("name"):
        what = f"model {saved.get('name')!r}, this run trains {ours.get('name')!r}"
    else:
        theirs, mine = saved.get("args", {}), ours.get("args", {})
        fields = sorted(name for name in set(theirs) | set(mine) if theirs.get(name) != mine.get(name))
        what = "; ".join(f"{name}: checkpoint {theirs.get(name)!r}, this run {mine.get(name)!r}" for name in fields[:6])
    return (f"the checkpoint to resume holds another model ({what}). Resume with the config that wrote it "
            "(--config <dump_folder>/config.json), or start a fresh run in another --job.dump_folder")


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)
    grad_norms: dict[int, float] = field(default_factory=dict)
    validation_losses: dict[int, float] = field(default_factory=dict)
    last_step: int = 0
    stopped_by_signal: bool = False
    summary: dict[str, float] = field(default_factory=dict)


class _StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and exits after the step.
    A second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("received %s: finishing this step, saving a checkpoint, then exiting",
                       signal.Signals(signum).name)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@functools.lru_cache(maxsize=64)
def _share_metric(label: str) -> str:
    """The metric name of a data source's share: its file or folder name."""
    return f"data/share/{os.path.basename(label.rstrip('/')) or label}"


class Trainer:
    def __init__(self, job: Job) -> None:
        self.job = job
        config, spec = job.config, job.spec
        self.config = config
        self.plugins = job.plugins
        self.spec = spec
        self.hook = job.hook
        self.parallel_dims = job.parallel_dims
        self.device_info: DeviceInfo = job.device
        self.device = self._init_distributed()
        check_memory_fits(job, self.device)
        self._seed()

        pd = self.parallel_dims
        training = config.training
        self.grad_accumulation_steps = job.grad_accumulation_steps
        self.model_args = job.model_args
        self.tokenizer, self.dataloader = self._build_data()
        self.validator = None
        if config.validation.interval:
            from plait.validation import Validator

            self.validator = Validator(config, self.tokenizer, dp_rank=pd.dp_rank(), dp_world_size=pd.dp_degree,
                                       device=self.device, pipeline=spec.data_pipeline, model_args=self.model_args)
        self.samples = None
        if config.training.sample_interval:
            from plait.training_samples import GreedyContinuations, TrainingSamples

            sampler = (spec.sampler(config, self.model_args, self.device) if spec.sampler is not None
                       else GreedyContinuations(config, self.tokenizer, device=self.device,
                                                max_len=getattr(job.model_args, spec.seq_len_arg or "", None)))
            self.samples = TrainingSamples(config, sampler, world_size=pd.world_size)
        try:
            self.model_parts, self.pipeline = self._build_model()
        except RuntimeError as error:
            if not is_out_of_memory(error):
                raise
            raise PlaitError(f"building the model ran out of {self.device.type} memory "
                             f"({str(error).splitlines()[0]}): choose a smaller model, lower --training.seq_len "
                             "(it sets the RoPE table's length), or shard over more ranks") from None
        self.loss_fn = run_loss_fn(job)
        if config.compile.enable:
            self.loss_fn = compiled_loss(self.loss_fn, backend=config.compile.backend)

        from plait.optim import build_lr_scheduler, build_optimizer

        optimizer = build_optimizer(config.optimizer, self.model_parts)
        self.optimizer = self.hook.plait_wrap_optimizer(
            optimizer=optimizer, model_parts=self.model_parts, config=config
        ) or optimizer
        self.lr_scheduler = build_lr_scheduler(config.lr_scheduler, self.optimizer, training.steps)
        from plait.model_args import args_to_dict

        declared = job.declared_model_args
        self.train_state = TrainState(model={
            "name": spec.name, "args": args_to_dict(declared) if dataclasses.is_dataclass(declared) else repr(declared),
        })
        self.step_times = StepTimes()

        from plait.checkpoint import CheckpointManager

        extra_states: dict[str, Any] = {"dataloader": self.dataloader, "train_state": self.train_state}
        for contributed in self.hook.plait_checkpoint_state(config=config):
            extra_states.update(contributed)
        self.checkpointer = CheckpointManager(
            config.checkpoint,
            dump_folder=config.job.dump_folder,
            model_parts=self.model_parts,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            states=extra_states,
            writes=job.needs.writes_checkpoints,
        )
        self.resumed_from = self.checkpointer.load()
        self._apply_schedule()
        if self.resumed_from == 0 and config.model.hf_dir:
            self._load_hf_weights(config.model.hf_dir)

        from plait.metrics import MetricsProcessor

        self.metrics = MetricsProcessor(
            config.metrics,
            dump_folder=config.job.dump_folder,
            total_steps=training.steps,
            flops_per_token=spec.flops_per_token(self.model_args, job.tokens_per_sample),
            peak_flops=self.device_info.peak_flops,
            device_type=self.device.type,
            memory_stats=self.device_info.capabilities.memory_stats,
            is_logging_rank=self.rank == 0,
            num_devices=pd.world_size * pd.replica_groups,  # tokens count every replica group
        )

    # ----------------------------------------------------------------------- setup

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    def _init_distributed(self) -> torch.device:
        info = self.device_info
        if info.type == "cuda":
            local_rank = rank_from_env("LOCAL_RANK")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device(info.type)
        pd = self.parallel_dims
        if pd.world_size > 1:
            if not dist.is_initialized() and not self.hook.plait_init_process_group(config=self.config, device=info):
                join_process_group(f"{device.type}:{info.backend}", self.config.job.pg_timeout_seconds)
            pd.build_mesh(device.type)
            self.hook.plait_mesh_built(parallel_dims=pd, config=self.config)
        return device

    def _seed(self) -> None:
        training = self.config.training
        torch.manual_seed(training.seed)
        if training.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False

    def _build_data(self) -> tuple[Any, Any]:
        """The tokenizer and the token loader, or (None, the model's own data pipeline)."""
        config, pd = self.config, self.parallel_dims
        if self.spec.data_pipeline is not None:
            from plait.data.batch import DataRequest

            return None, self.spec.data_pipeline(DataRequest(
                config=config, model_args=self.model_args, local_batch_size=config.training.local_batch_size,
                dp_rank=pd.dp_rank(), dp_world_size=pd.dp_degree,
            ))
        from plait.data import build_dataloader

        tokenizer = self.job.tokenizer
        loader = build_dataloader(config.data, tokenizer, seq_len=config.training.seq_len,
                                  local_batch_size=config.training.local_batch_size,
                                  dp_rank=pd.dp_rank(), dp_world_size=pd.dp_degree)
        return tokenizer, loader

    def _build_model(self) -> tuple[list[nn.Module], Any]:
        config, pd = self.config, self.parallel_dims
        parts, pipeline = self.job.build_model_parts(self.device)
        layout_independent = pd.world_size > 1 and (config.training.deterministic or not self._sharded_rng_supported())
        reference = self._reference_weights() if layout_independent else None
        for part in parts:
            materialize(part, self.device)
            if reference is None:
                with torch.no_grad():
                    part.init_weights()
            else:
                self._load_reference_weights(part, reference)
            part.train()
        n_params = sum(p.numel() for part in parts for p in part.parameters())
        shape = config.model.flavor or f"the shape of {config.model.hf_dir}"
        overrides = "".join(f", {name}={value}" for name, value in config.model.args.items())
        logger.info("model %s (%s%s): %s parameters", self.spec.name, shape, overrides, f"{n_params:,}")
        return parts, pipeline

    def _sharded_rng_supported(self) -> bool:
        """Whether DTensor random ops draw distinct numbers for each shard on this device
        (CUDA-like devices). Elsewhere (CPU) every shard would draw the same numbers."""
        import warnings

        from torch.distributed.tensor._random import is_rng_supported_mesh

        mesh = self.parallel_dims.get_optional_mesh("world")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # it warns when the answer is no
            return mesh is not None and is_rng_supported_mesh(mesh)

    def _reference_weights(self) -> dict[str, torch.Tensor]:
        """The weights a single process would initialize, for runs that must not depend on
        the layout (``--training.deterministic`` with several processes) and for devices
        whose DTensor random ops cannot draw per shard (CPU: every shard of a weight would
        get the same numbers). Costs one full fp32 copy of the model in CPU memory on every
        rank while it loads."""
        full = self.spec.build_meta(self.model_args)
        self.hook.plait_convert_model(model=full, config=self.config, model_spec=self.spec)
        materialize(full, "cpu")
        with torch.no_grad():
            full.init_weights()
        return full.state_dict()

    def _load_reference_weights(self, part: nn.Module, reference: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        rng = torch.get_rng_state()  # leave the RNG where a single process's init leaves it
        with torch.no_grad():
            part.init_weights()  # buffers that are not in the state dict (RoPE tables)
        torch.set_rng_state(rng)
        set_model_state_dict(part, reference, options=StateDictOptions(full_state_dict=True, strict=False))

    def _apply_schedule(self) -> None:
        """Set the LR from the schedule of this run (a resumed run may change --training.steps)."""
        scheduler = self.lr_scheduler
        for group, base_lr, factor in zip(self.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base_lr * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _load_hf_weights(self, hf_dir: str) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from plait.hf import load_hf_folder

        _, hf_state = load_hf_folder(hf_dir)  # the model args came from its config.json
        state = self.spec.hf_adapter.from_hf(hf_state, self.model_args)
        # A pipeline stage holds a subset of the model even when it is this rank's only part.
        options = StateDictOptions(full_state_dict=True, strict=self.pipeline is None)
        for part in self.model_parts:
            set_model_state_dict(part, state, options=options)
        logger.info("initialized weights from %s", hf_dir)

    # ----------------------------------------------------------------------- loop

    def batches(self) -> Iterator[tuple[Any, torch.Tensor]]:
        iterator = iter(self.dataloader)
        while True:
            with self.step_times.waiting_for_data():
                try:
                    inputs, labels = next(iterator)
                except StopIteration:
                    return
                inputs, labels = inputs.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            yield inputs, labels

    def train(self) -> TrainResult:
        try:
            result = self._train()
        except BaseException as error:
            self._end_hooks(result=None, error=error)
            raise
        self._end_hooks(result=result, error=None)
        return result

    def _record_run(self) -> None:
        """The batch, the config and schedule warnings, once at the start of the run."""
        import dataclasses

        from plait.model_args import args_to_dict
        from plait.optim import schedule_warnings

        config, job = self.config, self.job
        document = {"plugins": list(job.plugins.enabled), **config.to_dict()}
        if dataclasses.is_dataclass(self.model_args):
            document["model_args"] = args_to_dict(self.model_args)
        local, dp, accumulation = config.training.local_batch_size, self.parallel_dims.dp_degree, job.grad_accumulation_steps
        batch = {"local_sequences": local, "dp_degree": dp, "accumulation_steps": accumulation,
                 "global_sequences": local * dp * accumulation, "global_tokens": job.tokens_per_step}
        self.metrics.record_run(self.resumed_from + 1, config=document, batch=batch)
        if self.rank == 0:
            for warning in schedule_warnings(config.lr_scheduler, config.training.steps):
                logger.warning(warning)

    def _end_hooks(self, *, result: TrainResult | None, error: BaseException | None) -> None:
        try:
            self.hook.plait_train_end(config=self.config, result=result, error=error)
        except Exception as hook_error:
            if error is None:
                raise
            logger.error("a plugin failed in plait_train_end after the run failed: %r", hook_error)

    def _train(self) -> TrainResult:
        config, pd = self.config, self.parallel_dims
        total_steps = config.training.steps
        result = TrainResult(last_step=self.resumed_from)
        if self.resumed_from:
            logger.info("resumed from step %d", self.resumed_from)
        self._record_run()
        if self.resumed_from >= total_steps:
            logger.warning(
                "the checkpoint of step %d is at or past --training.steps %d: nothing to train. "
                "Raise --training.steps to train on.", self.resumed_from, total_steps,
            )
        tokens_per_step = self.job.tokens_per_step // pd.dp_degree  # on this rank
        batches = self.batches()
        profiler = StepProfiler(config.profiling, dump_folder=config.job.dump_folder, rank=self.rank,
                                device_type=self.device.type, first_step=self.resumed_from + 1,
                                memory_stats=self.device_info.capabilities.memory_stats)
        with _StopRequest() as stop, profiler:
            step = self.resumed_from
            while step < total_steps:
                step += 1
                start = time.perf_counter()
                self.step_times.reset()
                ctx = self._step_context(step, batches=batches)
                lr = self.lr_scheduler.get_last_lr()[0]
                before_step = self._data_and_rng_state()
                try:
                    step_loss = self.hook.plait_train_step(ctx=ctx)
                except RuntimeError as error:  # CPU allocators report memory exhaustion as a RuntimeError
                    if not is_out_of_memory(error):
                        raise
                    raise self._out_of_memory(step, profiler, error) from None
                except DataError as error:
                    raise self._bad_data(step, before_step, error) from None
                step = ctx.step  # a plugin that loaded a live peer's state (healing) moves the run on
                with self.step_times.syncing():
                    loss = self._global_mean(step_loss)
                    grad_norm = float(ctx.results["grad_norm"])
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    self._diverged(step, loss, grad_norm)
                self.train_state.step = step
                self.train_state.tokens_seen += tokens_per_step * pd.dp_degree
                seconds = time.perf_counter() - start
                metrics = self.metrics.record_step(
                    step, loss=loss, grad_norm=grad_norm, lr=lr, tokens=tokens_per_step * pd.dp_degree, seconds=seconds,
                    tokens_seen=self.train_state.tokens_seen, data_wait_seconds=self.step_times.data_wait,
                    extra=ctx.results.get("metrics"), details=self._step_details(ctx),
                )
                if self.rank == 0 and (step % config.metrics.log_freq == 0 or step == total_steps):
                    self.hook.plait_log_metrics(step=step, metrics=metrics, config=config)
                if self.validator is not None and self.validator.due(step, total_steps):
                    result.validation_losses[step] = self._validate(step)
                if self.samples is not None and self.samples.due(step, total_steps):
                    self._log_samples(step)
                result.losses[step] = loss
                result.grad_norms[step] = grad_norm
                result.last_step = step
                stopping = self._agree(stop.requested)
                self.hook.plait_checkpoint_save(
                    checkpointer=self.checkpointer, step=step, force=step == total_steps or stopping
                )
                profiler.step_done(step)
                if stopping:
                    result.stopped_by_signal = True
                    break
        self.checkpointer.wait()
        result.summary = self.metrics.summary()
        return result

    def _step_details(self, ctx: StepContext) -> dict[str, float]:
        """TensorBoard-only metrics of a step: the plugins' details, where the step's time
        went, bad rows skipped and a data mixture's realized shares (a model's own pipeline
        may report none)."""
        details = {**ctx.results.get("metric_details", {}), **self.step_times.as_metrics()}
        skipped = getattr(self.dataloader, "skipped_rows", 0)
        if skipped:
            details["data/bad_rows_skipped"] = float(skipped)
        shares = getattr(self.dataloader, "source_shares", None)
        for label, share in (shares() if shares is not None else {}).items():
            details[_share_metric(label)] = share
        return details

    def _validate(self, step: int) -> float:
        assert self.validator is not None
        outcome = self.validator.run(step, lambda: self._step_context(step, batches=None), self._global_mean)
        self.metrics.record_scalars(step, outcome.metrics(), console=outcome.console())
        if self.rank == 0:
            self.hook.plait_log_metrics(step=step, metrics=outcome.metrics(), config=self.config)
        return outcome.loss

    def _log_samples(self, step: int) -> None:
        """Texts to the console and TensorBoard; images to ``<dump_folder>/samples/step-N/`` as
        PNG files and to TensorBoard."""
        from plait.training_samples import write_png

        assert self.samples is not None
        samples = self.samples.run(self.model_parts[0])
        if self.rank != 0:
            return
        folder = Path(self.config.job.dump_folder) / "samples" / f"step-{step}"
        lines = [f"step {step}  samples:"]
        for index, sample in enumerate(samples):
            shown = repr(sample.text)
            if sample.image is not None:
                folder.mkdir(parents=True, exist_ok=True)
                write_png(folder / f"{index}.png", sample.image)
                self.metrics.record_image(step, f"samples/{index}", sample.image)
                shown = f"{folder / f'{index}.png'}" + (f" {shown}" if sample.text else "")
            lines.append(f"  {sample.prompt!r} -> {shown}")
        self.metrics.log_text("\n".join(lines))
        texts = [f"**{sample.prompt}**{sample.text}" for sample in samples if sample.text]
        if texts:
            self.metrics.record_text(step, "samples", "\n\n".join(texts))

    def _step_context(self, step: int, *, batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None) -> StepContext:
        return StepContext(
            step=step,
            config=self.config,
            parallel_dims=self.parallel_dims,
            model_parts=self.model_parts,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            loss_fn=self.loss_fn,
            grad_accumulation_steps=self.grad_accumulation_steps if batches is not None else 1,
            needs=self.job.needs,
            pipeline=self.pipeline,
            batches=batches,
            hook=self.hook,
            checkpointer=self.checkpointer,
        )

    def _out_of_memory(self, step: int, profiler: StepProfiler, error: Exception) -> PlaitError:
        self.checkpointer.wait()
        return PlaitError(
            f"step {step} ran out of {self.device.type} memory ({str(error).splitlines()[0]}). The last "
            "checkpoint is intact. Lower --training.local_batch_size (raise --training.global_batch_size "
            "to keep the batch through accumulation) or --training.seq_len, set --activation_checkpoint.mode "
            "full, or shard over more ranks; `plait plan` estimates the memory of a layout"
            + profiler.out_of_memory(step)
        )

    def _data_and_rng_state(self) -> tuple[dict[str, Any], torch.Tensor] | None:
        """Where the data and the RNG stand before a step, to save the last finished step
        if the step's data turns out bad (the token loader, which reads rows that can be
        bad; its state is a few numbers)."""
        from plait.data import TokenLoader

        if not self.config.checkpoint.enable or not isinstance(self.dataloader, TokenLoader):
            return None
        return self.dataloader.state_dict(), torch.get_rng_state()

    def _bad_data(self, step: int, before_step: tuple[dict[str, Any], torch.Tensor] | None,
                  error: DataError) -> DataError:
        """A bad row stops the run, but not before the last finished step is saved (its
        data position rewound to the start of the failed step): nothing trained is lost."""
        finished = step - 1
        saved = "no step was finished, nothing to save"
        if before_step is not None and finished > 0:
            data_state, rng = before_step
            self.dataloader.load_state_dict(data_state)
            torch.set_rng_state(rng)
            self.hook.plait_checkpoint_save(checkpointer=self.checkpointer, step=finished, force=True)
            self.checkpointer.wait()
            saved = f"checkpoint step {finished} is saved; resume with the same command once the data is fixed"
        return DataError(f"step {step}: the training data has a bad row: {error} ({saved})")

    def _diverged(self, step: int, loss: float, grad_norm: float) -> None:
        from plait.checkpoint import list_checkpoints

        self.checkpointer.wait()
        folder = os.path.join(self.config.job.dump_folder, self.config.checkpoint.folder)
        saved = list_checkpoints(folder) if os.path.isdir(folder) else []
        last_good = f"step {saved[-1]} in {folder}" if saved else "none was saved yet"
        raise TrainingDivergedError(
            f"step {step}: loss is {loss} (grad norm {grad_norm}), so training stopped. The last good "
            f"checkpoint ({last_good}) is intact. Lower --optimizer.lr, raise "
            "--lr_scheduler.warmup_steps or --training.max_norm, or check the data, then resume."
        )

    def _global_mean(self, value: torch.Tensor) -> float:
        """The loss averaged over data-parallel ranks (each holds the mean of its tokens)."""
        mesh = self.parallel_dims.get_optional_mesh("dp_cp")
        value = value.detach().float()
        if mesh is None:
            return value.item()
        value = value.clone()
        dist.all_reduce(value, group=mesh.get_group())
        return value.item() / mesh.size()

    def _agree(self, flag: bool) -> bool:
        """True on every rank if any rank got a stop signal."""
        if not dist.is_initialized():
            return flag
        tensor = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def close(self) -> None:
        self.checkpointer.close()
        self.metrics.close()
        if dist.is_initialized():
            dist.barrier()  # gloo may abort if the group dies right after an object collective
            dist.destroy_process_group()


