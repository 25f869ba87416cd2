"""plait's tokens/s in bf16 against float8, eager and compiled, side by side in one run.

    python benchmarks/low_precision_speed.py [--job 1B] [--device cuda] [--steps 15] [--repeats 2] \\
        [--variants bf16,bf16+compile,tensorwise+compile,rowwise+compile] [--json OUT]

Each variant is the job of ``vs_torchtitan_jobs.py`` (the ``1B`` job by default: bf16
compute, fp32 master weights) with or without ``torch.compile`` and with the float8 plugin's
recipe or none, run by the same runner as ``vs_torchtitan.py`` in a fresh process. The
variants take turns, each first in turn over ``--repeats`` rounds; the report gives each
variant's median tokens/s, MFU against the GPU's dense bf16 peak, peak memory and last loss,
and its ratio to the first variant. On CPU float8 is emulated (numerics, not speed).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from vs_torchtitan import (GIB, device_name, model_flops_per_token, nominal_peak_flops, run_system,  # noqa: E402
                           with_plait_schedule, write_assets)
from vs_torchtitan_jobs import JOBS  # noqa: E402

RECIPES = ("bf16", "tensorwise", "rowwise", "rowwise_with_gw_hp")


def parse_variant(text: str) -> dict:
    recipe, _, flag = text.partition("+")
    if recipe not in RECIPES or flag not in ("", "compile"):
        raise SystemExit(f"variant {text!r}: write RECIPE or RECIPE+compile, RECIPE one of {', '.join(RECIPES)}")
    return {"float8": "" if recipe == "bf16" else recipe, "compile": flag == "compile"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="1B", choices=list(JOBS))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default="bf16,bf16+compile,tensorwise+compile,rowwise+compile")
    parser.add_argument("--json")
    args = parser.parse_args()
    variants = {name: parse_variant(name) for name in args.variants.split(",")}
    base = JOBS[args.job]
    if args.steps <= base.warmup_steps:
        parser.error(f"--steps must exceed the job's {base.warmup_steps} warm-up steps")

    workdir = Path(tempfile.mkdtemp(prefix="low_precision_speed_"))
    write_assets(workdir)
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    names = list(variants)
    for repeat in range(args.repeats):
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for name in order:
            job = with_plait_schedule(base.with_overrides(steps=args.steps, device=args.device, dtype="bfloat16",
                                                          **variants[name]))
            job_file = workdir / f"{name}.job.json"
            job_file.write_text(job.to_json())
            run = run_system("plait", sys.executable, job_file, workdir, args.threads, f"{name}.{repeat}")
            runs[name].append(run)
            print(f"   {name:22} #{repeat}: {run['tokens_per_second']:10,.0f} tokens/s, peak "
                  f"{run['peak_memory_bytes'] / GIB:.2f} GiB, first step at {run['time_to_first_step']:.1f} s, "
                  f"loss {run['loss_first']:.4f} -> {run['loss_last']:.4f}", flush=True)

    flops = model_flops_per_token(base.with_overrides(steps=args.steps))
    peak = nominal_peak_flops(args.threads, args.device, "bfloat16")
    first = statistics.median(r["tokens_per_second"] for r in runs[names[0]])
    print(f"\n== {args.job} on {device_name(args.device)}, {args.steps} steps ({base.warmup_steps} warm-up "
          f"excluded), {args.repeats} round(s); MFU against {peak / 1e12:.1f} TFLOP/s dense bf16")
    print(f"   {'variant':22} {'tokens/s':>10} {'x ' + names[0]:>16} {'MFU %':>7} {'peak GiB':>9} {'last loss':>10}")
    table = {}
    for name in names:
        tokens = statistics.median(r["tokens_per_second"] for r in runs[name])
        row = {"tokens_per_second": tokens, "ratio": tokens / first, "mfu": tokens * flops / peak,
               "peak_memory_bytes": statistics.median(r["peak_memory_bytes"] for r in runs[name]),
               "loss_last": statistics.median(r["loss_last"] for r in runs[name]),
               "samples": [r["tokens_per_second"] for r in runs[name]]}
        table[name] = row
        print(f"   {name:22} {tokens:10,.0f} {row['ratio']:16.3f} {100 * row['mfu']:7.1f} "
              f"{row['peak_memory_bytes'] / GIB:9.2f} {row['loss_last']:10.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"job": args.job, "device": device_name(args.device),
                                               "steps": args.steps, "table": table}, indent=2))


if __name__ == "__main__":
    main()
