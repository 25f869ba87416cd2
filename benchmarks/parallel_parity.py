"""The parity table: every parallel layout against one process on the same global batch.

    python benchmarks/parallel_parity.py [--steps 6] [--only fsdp2,tp2]

Runs each model (the tiny llama3, 4 layers; the tiny qwen3-MoE and deepseek_v3 with
low-rank queries for the mixture-of-experts layouts; fp32, --training.deterministic) once in this process with the whole global batch, then each
layout as real gloo ranks, and prints the largest difference of the loss and of the
gradient norm over all steps. Layouts whose plugin is not installed are left out. The
tests assert the same bound (1e-5); this prints the measured figures.
"""
from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

GLOBAL_BATCH = 4

MODELS = {
    "llama3": ["--config", "llama3_debugmodel", "--model.flavor", "debugmodel_tiny4"],
    "qwen3-moe": ["--config", "qwen3_moe_debugmodel", "--moe.aux_loss_type", "sequence"],  # batch-wise depends on the split
    "deepseek_v3": ["--config", "deepseek_v3_debugmodel", "--model.flavor", "debugmodel_q_lora",
                    "--moe.aux_loss_type", "sequence"],
}

#: name -> (world size, plugin modules needed, options); the model is named in the layout's
#: parentheses (llama3 where none is)
LAYOUTS: dict[str, tuple[int, tuple[str, ...], list[str]]] = {
    "FSDP 2": (2, ("plait_fsdp",), ["--plugins", "fsdp", "--parallelism.dp_shard", "2"]),
    "FSDP 4": (4, ("plait_fsdp",), ["--plugins", "fsdp", "--parallelism.dp_shard", "4"]),
    "DDP 2": (2, ("plait_fsdp",), ["--plugins", "fsdp", "--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "1"]),
    "HSDP 2×2": (4, ("plait_fsdp",), ["--plugins", "fsdp", "--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "2"]),
    "TP 2": (2, ("plait_tp",), ["--plugins", "tp", "--parallelism.tp", "2"]),
    "FSDP 2 × TP 2": (4, ("plait_fsdp", "plait_tp"), ["--plugins", "fsdp,tp", "--parallelism.dp_shard", "2", "--parallelism.tp", "2"]),
    "HSDP 2×2 × TP 2": (8, ("plait_fsdp", "plait_tp"), ["--plugins", "fsdp,tp", "--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "2", "--parallelism.tp", "2"]),
    "CP 2": (2, ("plait_context_parallel",), ["--plugins", "context-parallel,fsdp", "--parallelism.cp", "2"]),
    "CP 2 × FSDP 2": (4, ("plait_context_parallel",), ["--plugins", "context-parallel,fsdp", "--parallelism.cp", "2", "--parallelism.dp_shard", "2"]),
    "PP 2 (1F1B)": (2, ("plait_pipeline",), ["--plugins", "pipeline", "--parallelism.pp", "2", "--pipeline.schedule", "1F1B"]),
    "PP 2 (Interleaved1F1B)": (2, ("plait_pipeline",), ["--plugins", "pipeline", "--parallelism.pp", "2", "--pipeline.schedule", "Interleaved1F1B"]),
    "PP 2 (DualPipeV)": (2, ("plait_pipeline",), ["--plugins", "pipeline", "--parallelism.pp", "2", "--pipeline.schedule", "DualPipeV"]),
    "PP 2 × FSDP 2": (4, ("plait_pipeline", "plait_fsdp"), ["--plugins", "pipeline,fsdp", "--parallelism.pp", "2", "--parallelism.dp_shard", "2"]),
    "PP 2 × TP 2": (4, ("plait_pipeline", "plait_tp"), ["--plugins", "pipeline,tp", "--parallelism.pp", "2", "--parallelism.tp", "2"]),
    "EP 2 (qwen3-MoE)": (2, ("plait_ep", "plait_qwen3"), ["--plugins", "ep,fsdp", "--parallelism.ep", "2"]),
    "EP 2 × FSDP 4 (qwen3-MoE)": (4, ("plait_ep", "plait_qwen3"), ["--plugins", "ep,fsdp", "--parallelism.ep", "2", "--parallelism.dp_shard", "4"]),
    "TP 2 (qwen3-MoE)": (2, ("plait_tp", "plait_qwen3"), ["--plugins", "tp", "--parallelism.tp", "2"]),
    "FSDP 2 × TP 2 (qwen3-MoE)": (4, ("plait_tp", "plait_qwen3"), ["--plugins", "fsdp,tp", "--parallelism.dp_shard", "2", "--parallelism.tp", "2"]),
    "EP 2 × TP 2 (qwen3-MoE)": (2, ("plait_ep", "plait_tp", "plait_qwen3"), ["--plugins", "ep,fsdp,tp", "--parallelism.ep", "2", "--parallelism.tp", "2"]),
    "EP 4 × FSDP 2 × TP 2 (qwen3-MoE)": (4, ("plait_ep", "plait_tp", "plait_qwen3"), ["--plugins", "ep,fsdp,tp", "--parallelism.ep", "4", "--parallelism.dp_shard", "2", "--parallelism.tp", "2"]),
    "CP 2 × EP 2 (qwen3-MoE)": (2, ("plait_ep", "plait_context_parallel", "plait_qwen3"), ["--plugins", "context-parallel,ep,fsdp", "--parallelism.cp", "2", "--parallelism.ep", "2"]),
    "TP 2 (deepseek_v3)": (2, ("plait_tp", "plait_deepseek_v3"), ["--plugins", "tp", "--parallelism.tp", "2"]),
    "EP 2 (deepseek_v3)": (2, ("plait_ep", "plait_deepseek_v3"), ["--plugins", "ep,fsdp", "--parallelism.ep", "2"]),
    "EP 2 × TP 2 (deepseek_v3)": (2, ("plait_ep", "plait_tp", "plait_deepseek_v3"), ["--plugins", "ep,fsdp,tp", "--parallelism.ep", "2", "--parallelism.tp", "2"]),
}  # fmt: skip


def model_of(layout: str) -> str:
    if "(qwen3-MoE)" in layout:
        return "qwen3-moe"
    return "deepseek_v3" if "(deepseek_v3)" in layout else "llama3"


def _folder(layout: str) -> str:
    return "".join(c for c in layout if c.isalnum() or c in "-_")


def job(dump: Path, model: str, steps: int, local_batch_size: int, *extra: str) -> list[str]:
    return [
        *MODELS[model],
        "--training.steps", str(steps), "--training.seq_len", "64",
        "--training.local_batch_size", str(local_batch_size), "--training.deterministic", "True",
        "--lr_scheduler.warmup_steps", "2", "--checkpoint.enable", "False", "--metrics.progress", "off",
        "--metrics.enable_tensorboard", "False", "--job.pg_timeout_seconds", "120", "--job.dump_folder", str(dump),
        *extra,
    ]  # fmt: skip


def data_parallel_degree(world_size: int, options: list[str]) -> int:
    model_parallel = 1
    for flag, value in zip(options, options[1:]):
        if flag in ("--parallelism.tp", "--parallelism.cp", "--parallelism.pp"):
            model_parallel *= int(value)
    return world_size // model_parallel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--only", default="", help="comma-separated layout names (default: all installed)")
    args = parser.parse_args()

    import torch

    from plait.cli import train
    from plait.testing import run_ranks

    wanted = [name.strip() for name in args.only.split(",") if name.strip()] or list(LAYOUTS)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        references = {}
        print(f"{'layout':<34} {'ranks':>5} {'max |Δloss|':>12} {'max |Δgrad norm|':>17} {'seconds':>8}")
        for name in wanted:
            world_size, modules, options = LAYOUTS[name]
            if any(importlib.util.find_spec(module) is None for module in modules):
                print(f"{name:<34} {world_size:>5}   (plugin not installed)")
                continue
            model = model_of(name)
            if model not in references:
                references[model] = train(job(root / model, model, args.steps, GLOBAL_BATCH))
                torch.use_deterministic_algorithms(False)
            reference = references[model]
            local = GLOBAL_BATCH // data_parallel_degree(world_size, options)
            started = time.perf_counter()
            run = run_ranks(world_size, job(root / _folder(name), model, args.steps, local, *options),
                            root / f"{name.replace(' ', '')}.json")
            seconds = time.perf_counter() - started
            loss = max(abs(run["losses"][s] - reference.losses[s]) for s in reference.losses)
            norm = max(abs(run["grad_norms"][s] - reference.grad_norms[s]) for s in reference.grad_norms)
            print(f"{name:<34} {world_size:>5} {loss:>12.2e} {norm:>17.2e} {seconds:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
