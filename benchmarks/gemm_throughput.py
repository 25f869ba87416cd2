"""Matmul throughput this machine reaches at a job's shapes, with torch's own kernels.

    python benchmarks/gemm_throughput.py [--job 100M] [--threads 1] [--device cpu|cuda]
        [--dtype float32|bfloat16] [--json OUT]

Times every linear-layer matmul of one training step of the job (``step_gemms`` in
``vs_torchtitan_jobs.py``: forward ``x @ W^T``, input gradient ``dy @ W``, weight
gradient ``dy^T @ x``, at the tokens of one step) and prints each one's GFLOP/s and the
step-weighted total: the FLOP/s a step would reach if it did nothing but these matmuls
back to back. ``vs_torchtitan.py`` reports MFU against that figure as well as against
the nominal peak (/proc/cpuinfo on CPU, the datasheet's dense bf16 figure on a GPU).
Operands are in the job's compute dtype (``--dtype``, the job's by default).
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from vs_torchtitan_jobs import JOBS, Gemm, Job, step_gemms


def gemm_op(gemm: Gemm, device: str = "cpu", dtype: str = "float32") -> Callable[[], object]:
    """The matmul autograd runs for ``gemm``, on random operands of its layout."""
    import torch
    import torch.nn.functional as F

    m, n, k = gemm.m, gemm.n, gemm.k
    options = {"device": device, "dtype": getattr(torch, dtype)}
    if gemm.kind == "forward":  # y[T, out] = x[T, in] @ W[out, in]^T
        x, w = torch.randn(m, k, **options), torch.randn(n, k, **options)
        return lambda: F.linear(x, w)
    if gemm.kind == "grad_input":  # dx[T, in] = dy[T, out] @ W[out, in]
        dy, w = torch.randn(m, k, **options), torch.randn(k, n, **options)
        return lambda: dy @ w
    if gemm.kind == "grad_weight":  # dW[out, in] = dy[T, out]^T @ x[T, in]
        dy, x = torch.randn(k, m, **options), torch.randn(k, n, **options)
        return lambda: dy.t() @ x
    raise ValueError(f"unknown GEMM kind {gemm.kind!r}")


def time_call(call: Callable[[], object], *, min_seconds: float, repeats: int,
              synchronize: Callable[[], None] = lambda: None) -> float:
    """Seconds per call: the best of ``repeats`` timings of at least ``min_seconds`` each
    (what the machine achieves; other load on a shared machine only slows a sample down).
    ``synchronize`` waits for an asynchronous device: calls are timed in growing batches
    that end with it."""
    call()  # first call: allocation, kernel selection
    synchronize()
    samples = []
    for _ in range(repeats):
        calls, batch, started = 0, 1, time.perf_counter()
        while True:
            for _ in range(batch):
                call()
            synchronize()
            calls += batch
            batch *= 2
            elapsed = time.perf_counter() - started
            if elapsed >= min_seconds:
                break
        samples.append(elapsed / calls)
    return min(samples)


def measure(job: Job, *, min_seconds: float = 0.2, repeats: int = 5, device: str = "cpu",
            dtype: str | None = None) -> dict:
    """Seconds per call and FLOP/s of each of the job's step GEMMs, and the step-weighted total."""
    import torch

    dtype = dtype or job.dtype
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for gemm in step_gemms(job):
        seconds = time_call(gemm_op(gemm, device, dtype), min_seconds=min_seconds, repeats=repeats,
                            synchronize=synchronize)
        rows.append({"name": gemm.name, "m": gemm.m, "n": gemm.n, "k": gemm.k, "count": gemm.count,
                     "seconds": seconds, "flops_per_second": gemm.flops / seconds})
    step_flops = sum(g.flops * g.count for g in step_gemms(job))
    step_seconds = sum(row["seconds"] * row["count"] for row in rows)
    return {"job": job.name, "device": device, "dtype": dtype, "gemms": rows, "step_gemm_flops": step_flops,
            "step_gemm_seconds": step_seconds, "flops_per_second": step_flops / step_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="100M", choices=sorted(JOBS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="operand dtype (default: the job's)")
    parser.add_argument("--min-seconds", type=float, default=0.2, help="shortest timing of one sample")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    result = measure(JOBS[args.job], min_seconds=args.min_seconds, device=args.device, dtype=args.dtype)
    result["threads"] = torch.get_num_threads()
    for row in result["gemms"]:
        print(f"{row['name']:>16}  [{row['m']:>5} x {row['k']:>5}] x [{row['k']:>5} x {row['n']:>5}]  "
              f"x{row['count']:<3} {row['seconds'] * 1e3:8.2f} ms  {row['flops_per_second'] / 1e9:7.1f} GFLOP/s")
    print(f"{args.job}: step matmuls {result['step_gemm_flops'] / 1e9:.1f} GFLOP in "
          f"{result['step_gemm_seconds']:.3f} s = {result['flops_per_second'] / 1e9:.1f} GFLOP/s "
          f"{result['dtype']} on {result['device']} ({result['threads']} thread(s))")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
