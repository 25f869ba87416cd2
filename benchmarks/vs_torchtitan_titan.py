"""Run one ``vs_torchtitan`` job on torchtitan 0.3.0 (CPU) and write its measurements.

    PYTHON_WITH_TORCHTITAN vs_torchtitan_titan.py JOB.json ASSETS_DIR RESULT.json

Started by ``vs_torchtitan.py``, in torchtitan's own environment (plait is not installed
there). It goes through torchtitan's normal path -- ``ConfigManager().parse_args()`` with
``--module``/``--config`` naming this file's ``benchmark_job`` config function, then
``config.build()`` and ``trainer.train()`` as in ``torchtitan/train.py`` -- with these
changes, each needed for the job to run on CPU and to be the same job as plait's:

* CPU (a ``cpu`` job): torchtitan 0.3.0 picks ``cuda`` when no accelerator is present
  and reads CUDA memory statistics; here the device type is ``cpu`` and memory is the
  process's RSS. ``set_pg_timeouts`` (a barrier with a device id after step 1) is
  skipped: one process. A ``cuda`` job runs torchtitan's own device path unchanged; its
  peak memory is ``torch.cuda.max_memory_allocated`` read before each of torchtitan's
  metric logs (which reset it).
* attention: its language models use FlexAttention with per-document masks, and
  FlexAttention has no backward on CPU; the job uses its ``ScaledDotProductAttention``
  (causal), the attention plait's llama3 uses.
* data: its ``HuggingFaceTextDataset`` reads the job's JSON-lines corpus through
  ``datasets`` and its ``HuggingFaceTokenizer`` reads the tokenizer folder; the packing is
  plait's (``bos + tokens + eos`` concatenated, cut into windows of ``seq_len + 1``) and
  RoPE positions run 0..seq_len-1, so both systems train on the same token windows.
* dtype: torchtitan wraps the model in FSDP2 even at one rank, with a bf16 parameter
  dtype by default; ``mixed_precision_param`` is set to the job's compute dtype and the
  master weights stay fp32 (``training.dtype``), as plait's ``--training.dtype``.
* float8 (a job with a recipe): torchtitan's ``Float8LinearConverter`` on the model
  config, as its float8 recipes do, with the output layer filtered; on a GPU with
  torchao's size filter (``auto_filter_small_kn``), on CPU emulated (eager only, its
  limit) and with no size filter, as plait's runner. torchtitan 0.3.0's config names
  only the rowwise recipes; the converter hands the name to torchao, which still has
  ``tensorwise``, so a tensorwise job runs torchao's tensorwise recipe there too.
* the model shape, RoPE (no frequency scaling), AdamW hyperparameters (no weight decay
  on norm scales), LR per step, seed, clipping, no activation checkpointing and
  ``torch.compile`` of model and loss (or none) are the job's. Everything else is
  torchtitan's llama3 debug recipe: fused QKV, complex RoPE, ``nn.RMSNorm``, chunked
  loss, fused AdamW, GC every 50 steps.

torchtitan 0.3.0 imports ``triton`` at import time without declaring it: install it in
torchtitan's environment (it is only imported on CPU, never run).
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from vs_torchtitan_jobs import Job

EXPECTED_TORCHTITAN = "0.3.0"
JOB_ENV = "VS_TORCHTITAN_JOB"
ASSETS_ENV = "VS_TORCHTITAN_ASSETS"


DEVICE_ENV = "VS_TORCHTITAN_DEVICE"
ON_CPU = os.environ.get(DEVICE_ENV, "cpu") == "cpu"


def _use_cpu() -> None:
    """Make torchtitan's device detection say ``cpu`` (it must run before torchtitan imports)."""
    import torch._utils

    torch._utils._get_available_device_type = lambda: "cpu"


if ON_CPU:
    _use_cpu()

import torch  # noqa: E402
import torchtitan  # noqa: E402
from torchtitan.components import metrics as tt_metrics  # noqa: E402
from torchtitan.components.dataloader import ParallelAwareDataloader  # noqa: E402
from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss  # noqa: E402
from torchtitan.components.optimizer import LRSchedulersContainer, OptimizersContainer  # noqa: E402
from torchtitan.components.optimizer.optimizer import ParamGroupConfig  # noqa: E402
from torchtitan.components.quantization import Float8LinearConverter  # noqa: E402
from torchtitan.config import ParallelismConfig, TrainingConfig  # noqa: E402
from torchtitan.config.configs import CompileConfig, DebugConfig  # noqa: E402
from torchtitan.distributed import utils as dist_utils  # noqa: E402
from torchtitan.hf_datasets import DatasetConfig  # noqa: E402
from torchtitan.hf_datasets import text_datasets  # noqa: E402
from torchtitan.models import llama3 as tt_llama3  # noqa: E402
from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm  # noqa: E402
from torchtitan.models.common.attention import ScaledDotProductAttention  # noqa: E402
from torchtitan.models.common.config_utils import decoder_vocab_size  # noqa: E402
from torchtitan.protocols.model_spec import ModelSpec  # noqa: E402
from torchtitan.trainer import Trainer  # noqa: E402

if torchtitan.__version__ != EXPECTED_TORCHTITAN:
    raise SystemExit(
        f"vs_torchtitan_titan.py is written against torchtitan {EXPECTED_TORCHTITAN} (its config "
        f"classes and private llama3 builders); found {torchtitan.__version__}. Install "
        f"torchtitan=={EXPECTED_TORCHTITAN} in the environment passed as --torchtitan-python."
    )


# --------------------------------------------------------------------------- CPU


class _CPUMemoryMonitor:
    """torchtitan's DeviceMemoryMonitor for CPU: the process's peak RSS."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = torch.device("cpu")
        self.device_name = "cpu"
        self.device_capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        self.device_capacity_gib = self.device_capacity / 2**30

    def get_peak_stats(self) -> tt_metrics.DeviceMemStats:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        gib, pct = peak / 2**30, 100 * peak / self.device_capacity
        return tt_metrics.DeviceMemStats(gib, pct, gib, pct, 0, 0)

    def reset_peak_stats(self) -> None:
        pass


if ON_CPU:
    tt_metrics.DeviceMemoryMonitor = _CPUMemoryMonitor
    dist_utils.set_pg_timeouts = lambda **kwargs: None


# --------------------------------------------------------------------------- data


class StreamPackedDataset(text_datasets.HuggingFaceTextDataset):
    """torchtitan's text dataset with plait's packing: one token stream of
    ``bos + tokens + eos`` documents cut into consecutive windows of ``seq_len + 1``."""

    def __iter__(self):
        window = self.seq_len + 1
        buffer: list[int] = []
        while True:
            for sample in self._get_data_iter():
                text = self._text_processor(sample)
                buffer.extend(self._tokenizer.encode(text, add_bos=True, add_eos=True))
                self._sample_idx += 1
                while len(buffer) >= window:
                    tokens = torch.LongTensor(buffer[:window])
                    del buffer[:window]
                    yield {"input": tokens[:-1]}, tokens[1:]
            if not self.infinite:
                return
            self.reloop()


class StreamPackedDataLoader(ParallelAwareDataloader):
    @dataclass(kw_only=True, slots=True)
    class Config(ParallelAwareDataloader.Config):
        dataset: str = "vs_torchtitan_corpus"

    def __init__(self, config: Config, *, dp_world_size: int, dp_rank: int, tokenizer, seq_len: int,
                 local_batch_size: int, snapshot_every_n_steps: int | None = 1, **kwargs) -> None:
        dataset = StreamPackedDataset(
            dataset_name=config.dataset, dataset_path=config.dataset_path, tokenizer=tokenizer,
            seq_len=seq_len, dp_rank=dp_rank, dp_world_size=dp_world_size, infinite=True,
        )
        super().__init__(dataset, dp_rank=dp_rank, dp_world_size=dp_world_size, batch_size=local_batch_size,
                         num_workers=config.num_workers, snapshot_every_n_steps=snapshot_every_n_steps)
        self.first_batch_sha256 = ""

    def __iter__(self):
        for inputs, labels in super().__iter__():
            if not self.first_batch_sha256:
                self.first_batch_sha256 = batch_fingerprint(inputs["input"], labels)
            yield inputs, labels


def batch_fingerprint(inputs: torch.Tensor, labels: torch.Tensor) -> str:
    digest = hashlib.sha256(inputs.to(torch.int64).numpy().tobytes())
    digest.update(labels.to(torch.int64).numpy().tobytes())
    return digest.hexdigest()[:16]


def register_corpus(corpus: Path) -> None:
    """torchtitan's way to add a dataset: an entry of ``text_datasets.DATASETS``."""
    from datasets import load_dataset

    text_datasets.DATASETS["vs_torchtitan_corpus"] = DatasetConfig(
        path=str(corpus),
        loader=lambda path: load_dataset("json", data_files=path, split="train", streaming=True),
        sample_processor=lambda sample: sample["text"],
    )


# --------------------------------------------------------------------------- schedule


class FixedFactorLRSchedulers(LRSchedulersContainer):
    """LambdaLR over the job's per-step factors (plait's schedule, computed by the harness)."""

    @dataclass(kw_only=True, slots=True)
    class Config(LRSchedulersContainer.Config):
        factors: list[float] = field(default_factory=list)

        def build(self, *, optimizers, training_steps):  # noqa: ANN001, ANN201 - torchtitan's signature
            factors = list(self.factors)
            if len(factors) < training_steps:
                raise ValueError(f"{len(factors)} LR factors for {training_steps} steps")
            return FixedFactorLRSchedulers(optimizers, lambda step: factors[min(step, len(factors) - 1)])


# --------------------------------------------------------------------------- model


def model_config(job: Job) -> tt_llama3.Llama3Model.Config:
    """torchtitan's llama3 (its debug recipe's builders and initializers) at the job's shape."""
    shape = job.shape
    rope = ComplexRoPE.Config(dim=shape.head_dim, max_seq_len=job.seq_len, theta=shape.rope_theta, scaling="none")
    layers = tt_llama3._build_llama3_layers(
        fuse_qkv=True, n_layers=shape.n_layers, dim=shape.dim, n_heads=shape.n_heads, n_kv_heads=shape.n_kv_heads,
        hidden_dim=shape.ffn_dim, rope=rope, attn_backend="flex",
    )
    for layer in layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
        layer.attention_norm.eps = layer.ffn_norm.eps = shape.norm_eps
    return tt_llama3.Llama3Model.Config(
        dim=shape.dim,
        vocab_size=shape.vocab_size,
        tok_embeddings=Embedding.Config(
            num_embeddings=shape.vocab_size, embedding_dim=shape.dim, param_init=tt_llama3._EMBEDDING_INIT
        ),
        norm=RMSNorm.Config(normalized_shape=shape.dim, eps=shape.norm_eps, param_init=tt_llama3._NORM_INIT),
        lm_head=Linear.Config(
            in_features=shape.dim, out_features=shape.vocab_size,
            param_init=tt_llama3._output_linear_init(shape.dim),
        ),
        layers=layers,
    )


def with_float8(model: tt_llama3.Llama3Model.Config, job: Job) -> tt_llama3.Llama3Model.Config:
    """The model config with torchtitan's float8 linears for the job's recipe (if any)."""
    if not job.float8:
        return model
    filters = ["output"] if ON_CPU else ["output", "auto_filter_small_kn"]
    converter = Float8LinearConverter.Config(recipe_name=job.float8, filter_fqns=filters, emulate=ON_CPU,
                                             model_compile_enabled=job.compile)
    return converter.build().convert(model)


def adamw(job: Job) -> OptimizersContainer.Config:
    kwargs = {"lr": job.lr, "betas": job.betas, "eps": job.eps}
    return OptimizersContainer.Config(param_groups=[
        ParamGroupConfig(pattern=r"(^|.*\.)(attention_norm|ffn_norm|norm)\.weight$", optimizer_name="AdamW",
                         optimizer_kwargs={**kwargs, "weight_decay": 0.0}),
        ParamGroupConfig(pattern=r".*", optimizer_name="AdamW",
                         optimizer_kwargs={**kwargs, "weight_decay": job.weight_decay}),
    ])


def benchmark_job() -> Trainer.Config:
    """The config function ``--module vs_torchtitan_titan --config benchmark_job`` names."""
    job = Job.from_json(Path(os.environ[JOB_ENV]).read_text())
    assets = Path(os.environ[ASSETS_ENV])
    register_corpus(assets / "corpus.jsonl")
    model = with_float8(model_config(job), job)
    spec = tt_llama3.model_registry("debugmodel")
    spec = ModelSpec(
        name="llama3", flavor=job.name, model=model, parallelize_fn=spec.parallelize_fn,
        pipelining_fn=spec.pipelining_fn, post_optimizer_build_fn=None, state_dict_adapter=spec.state_dict_adapter,
    )
    return Trainer.Config(
        loss=ChunkedLossWrapper.Config(loss_fn=CrossEntropyLoss.Config(global_vocab_size=decoder_vocab_size(spec))),
        hf_assets_path=str(assets / "tokenizer"),
        dump_folder=str(assets / "torchtitan_outputs"),
        model_spec=spec,
        optimizer=adamw(job),
        lr_scheduler=FixedFactorLRSchedulers.Config(warmup_steps=0, factors=list(job.lr_factors)),
        training=TrainingConfig(
            local_batch_size=job.batch_size, seq_len=job.seq_len, steps=job.steps, max_norm=job.max_norm,
            dtype="float32", mixed_precision_param=job.dtype, disable_cuda_graphs=True,
        ),
        compile=CompileConfig(enable=job.compile, components=["model", "loss"]),
        dataloader=StreamPackedDataLoader.Config(),
        metrics=tt_metrics.MetricsProcessor.Config(log_freq=1),
        parallelism=ParallelismConfig(),
        activation_checkpoint=None,
        debug=DebugConfig(seed=job.seed),
    )


# --------------------------------------------------------------------------- run


def train_and_close(trainer: Trainer) -> None:
    """``trainer.train()``, then the trainer and the process group closed, whatever happened."""
    try:
        trainer.train()
    finally:
        trainer.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def main() -> None:
    job_file, assets, result_file = sys.argv[1:4]
    threads = int(os.environ["VS_TORCHTITAN_THREADS"])
    torch.set_num_threads(threads)
    job = Job.from_json(Path(job_file).read_text())
    if job.device != os.environ.get(DEVICE_ENV, "cpu"):
        raise SystemExit(f"the job is for {job.device}, but ${DEVICE_ENV} says {os.environ.get(DEVICE_ENV, 'cpu')}")
    on_cuda = job.device == "cuda"
    os.environ[JOB_ENV], os.environ[ASSETS_ENV] = job_file, assets
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", os.environ.get("VS_TORCHTITAN_PORT", "29517"))

    sys.modules.setdefault("vs_torchtitan_titan", sys.modules[__name__])  # --module finds this file

    from torchtitan.config import ConfigManager
    from torchtitan.observability import structured_logger as sl
    from torchtitan.tools.logging import init_logger

    init_logger()  # as torchtitan/train.py's main()
    config = ConfigManager().parse_args(["--module", "vs_torchtitan_titan", "--config", "benchmark_job"])
    sl.init_structured_logger(source="training", output_dir=config.dump_folder,
                              enable=config.debug.enable_structured_logging)
    trainer = config.build()
    step_ends: list[float] = []
    losses: dict[int, float] = {}
    lrs: dict[int, float] = {}
    first_step_wall = 0.0
    peak_device_bytes = 0

    save = trainer.checkpointer.save

    def timed_save(curr_step: int, *args, **kwargs):  # after every step, as plait's save point
        nonlocal first_step_wall
        save(curr_step, *args, **kwargs)
        if on_cuda:
            torch.cuda.synchronize()
        step_ends.append(time.perf_counter())
        if curr_step == 1:
            first_step_wall = time.time()

    log = trainer.metrics_processor.log

    def recording_log(step: int, global_avg_loss: float, *args, extra_metrics=None, **kwargs):  # noqa: ANN001
        nonlocal peak_device_bytes
        if on_cuda:  # before torchtitan's log, which resets the peak
            peak_device_bytes = max(peak_device_bytes, torch.cuda.max_memory_allocated())
        losses[step] = float(global_avg_loss)
        lrs[step] = max(v for k, v in (extra_metrics or {}).items() if k.startswith("lr/"))
        return log(step, global_avg_loss, *args, extra_metrics=extra_metrics, **kwargs)

    trainer.checkpointer.save = timed_save
    trainer.metrics_processor.log = recording_log
    train_and_close(trainer)
    result = {
        "system": "torchtitan",
        "version": torchtitan.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "optimizer": config.optimizer.implementation,
        "parameters": sum(p.numel() for part in trainer.model_parts for p in part.parameters()),
        "flops_per_token_own": trainer.metrics_processor.num_flops_per_token,
        "first_batch_sha256": trainer.dataloader.first_batch_sha256,
        "first_step_wall": first_step_wall,
        "step_ends": step_ends,
        "losses": {str(k): v for k, v in sorted(losses.items())},
        "lrs": {str(k): v for k, v in sorted(lrs.items())},
        "device": next(trainer.model_parts[0].parameters()).device.type,
        "compile": config.compile.enable,
        "float8": job.float8 if any(type(m).__name__ == "Float8Linear" for m in trainer.model_parts[0].modules()) else "",
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_device_bytes": peak_device_bytes if on_cuda else None,
    }
    Path(result_file).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
