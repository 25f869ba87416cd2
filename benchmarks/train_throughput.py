"""Steady-state training throughput and peak memory of one plait job.

    python benchmarks/train_throughput.py --config llama3_debugmodel [--steps 30] [-- extra plait options]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="llama3_debugmodel")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("extra", nargs="*", help="more plait train options, after --")
    args = parser.parse_args()

    import torch

    from plait.cli import train

    with tempfile.TemporaryDirectory() as dump:
        argv = [
            "--config", args.config,
            "--training.steps", str(args.steps),
            "--checkpoint.enable", "False",
            "--metrics.enable_tensorboard", "False",
            "--metrics.progress", "off",
            "--metrics.log_freq", str(args.steps),
            "--job.dump_folder", dump,
            *args.extra,
        ]
        started = time.perf_counter()
        result = train(argv)
        wall = time.perf_counter() - started
    summary = result.summary
    report = {
        "config": args.config,
        "extra": args.extra,
        "steps": args.steps,
        "warmup_excluded": 2,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "wall_seconds": round(wall, 2),
        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()},
        "loss_first": result.losses[min(result.losses)],
        "loss_last": result.losses[max(result.losses)],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
