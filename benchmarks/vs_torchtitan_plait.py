"""Run one ``vs_torchtitan`` job on plait and write its measurements.

    python vs_torchtitan_plait.py JOB.json ASSETS_DIR RESULT.json

Started by ``vs_torchtitan.py``. It does what ``plait train`` does (``plait.cli.train``)
with the job's options, reading the same corpus and tokenizer files as torchtitan, and
registers one throwaway plugin that timestamps the end of every step (the checkpoint
save point, after the optimizer step and the metrics; on a GPU after a synchronize) and
fingerprints the first batch. plait picks the GPU when torch sees one: the harness hides
it (``CUDA_VISIBLE_DEVICES=""``) for a CPU job.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time
from pathlib import Path

from plait import PLUGIN_API_VERSION, hookimpl
from vs_torchtitan_jobs import Job


class StepTimer:
    """A plait plugin: ``plait_checkpoint_save`` wraps the save point after each step."""

    PLAIT_API_VERSION = PLUGIN_API_VERSION

    def __init__(self, synchronize) -> None:  # noqa: ANN001
        self.synchronize = synchronize
        self.step_ends: list[float] = []
        self.first_step_wall = 0.0
        self.first_batch_sha256 = ""
        self.lrs: dict[int, float] = {}

    @hookimpl
    def plait_before_optimizer_step(self, ctx) -> None:  # noqa: ANN001
        self.lrs[ctx.step] = max(group["lr"] for group in ctx.optimizer.param_groups)
        if not self.first_batch_sha256:
            digest = hashlib.sha256(ctx.inputs.cpu().numpy().tobytes())
            digest.update(ctx.labels.cpu().numpy().tobytes())
            self.first_batch_sha256 = digest.hexdigest()[:16]

    @hookimpl(wrapper=True)
    def plait_checkpoint_save(self, checkpointer, step: int, force: bool):  # noqa: ANN001, ANN201
        result = yield
        self.synchronize()
        self.step_ends.append(time.perf_counter())
        if step == 1:
            self.first_step_wall = time.time()
        return result


def plait_argv(job: Job, assets: Path, data: str = "files") -> list[str]:
    """``plait train`` options for ``job``: the debug recipe with the job's every setting.
    ``data`` "files" reads the harness's corpus and tokenizer files, "embedded" plait's
    embedded corpus and tokenizer (the same documents and tokens)."""
    files = ["--data.dataset", str(assets / "corpus.jsonl"), "--data.tokenizer", str(assets / "tokenizer")]
    return [
        "--config", "llama3_debugmodel",
        "--model.flavor", job.plait_flavor,
        "--training.steps", str(job.steps),
        "--training.seq_len", str(job.seq_len),
        "--training.local_batch_size", str(job.batch_size),
        "--training.max_norm", str(job.max_norm),
        "--training.dtype", job.dtype,
        "--training.seed", str(job.seed),
        "--optimizer.lr", str(job.lr),
        "--optimizer.beta1", str(job.betas[0]),
        "--optimizer.beta2", str(job.betas[1]),
        "--optimizer.eps", str(job.eps),
        "--optimizer.weight_decay", str(job.weight_decay),
        "--lr_scheduler.warmup_steps", str(job.lr_warmup_steps),
        *(files if data == "files" else []),
        "--compile.enable", str(job.compile),
        "--checkpoint.enable", "False",
        "--metrics.enable_tensorboard", "False",
        "--metrics.progress", "off",
        "--metrics.log_freq", "1",
        "--job.dump_folder", str(assets / "plait_outputs"),
        *float8_argv(job),
    ]


def float8_argv(job: Job) -> list[str]:
    """The float8 plugin with the job's recipe; on CPU emulated, converting every linear
    but the output layer (torchao's size thresholds are a GPU's)."""
    if not job.float8:
        return []
    emulated = ["--float8.emulate", "True", "--float8.auto_filter", "False"] if job.device == "cpu" else []
    return ["--plugins", "float8", "--float8.recipe", job.float8, "--float8.filter_fqns", "output", *emulated]


def check_shape(args, job: Job) -> None:  # noqa: ANN001
    """The flavor must be the job's model, field by field."""
    shape = job.shape
    ours = (args.dim, args.n_layers, args.n_heads, args.kv_heads, args.vocab_size, args.ffn_dim,
            args.rope_theta, args.norm_eps, args.use_rope_scaling, args.tie_word_embeddings)
    wanted = (shape.dim, shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.vocab_size, shape.ffn_dim,
              shape.rope_theta, shape.norm_eps, False, False)
    if ours != wanted:
        raise SystemExit(f"plait flavor {job.plait_flavor!r} is {ours}, but job {job.name!r} needs {wanted} "
                         "(dim, layers, heads, kv heads, vocab, ffn, rope theta, norm eps, rope scaling, tied)")


def main() -> None:
    job_file, assets, result_file = sys.argv[1:4]
    job, assets = Job.from_json(Path(job_file).read_text()), Path(assets)

    import torch

    torch.set_num_threads(int(os.environ["VS_TORCHTITAN_THREADS"]))

    import plait
    from plait.cli import resolve_train_config, setup_logging, write_resolved_config
    from plait.train import Trainer

    data = os.environ.get("VS_TORCHTITAN_PLAIT_DATA", "files")
    resolved = resolve_train_config(plait_argv(job, assets, data))
    manager, spec, config = resolved.plugins, resolved.spec, resolved.config
    check_shape(spec.args_for(config.model.flavor), job)
    timer = StepTimer(torch.cuda.synchronize if job.device == "cuda" else (lambda: None))
    manager.register_object(timer, "vs_torchtitan_timer")
    setup_logging(0)
    write_resolved_config(config, manager)
    trainer = Trainer(resolved)
    if trainer.device.type != job.device:
        raise SystemExit(f"plait trains on {trainer.device.type}, the job is for {job.device}")
    try:
        train_result = trainer.train()
    finally:
        trainer.close()
    result = {
        "system": "plait",
        "version": plait.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "optimizer": config.optimizer.implementation,
        "data": data,
        "parameters": sum(p.numel() for part in trainer.model_parts for p in part.parameters()),
        "first_batch_sha256": timer.first_batch_sha256,
        "first_step_wall": timer.first_step_wall,
        "step_ends": timer.step_ends,
        "losses": {str(k): v for k, v in sorted(train_result.losses.items())},
        "lrs": {str(k): v for k, v in sorted(timer.lrs.items())},
        "device": trainer.device.type,
        "compile": config.compile.enable,
        "float8": config.float8.recipe if "float8" in manager.enabled else "",
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        # plait never resets the device's peak: this is the whole run's
        "peak_device_bytes": torch.cuda.max_memory_allocated() if job.device == "cuda" else None,
    }
    Path(result_file).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
