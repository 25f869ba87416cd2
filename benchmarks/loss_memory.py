"""Peak memory and time of the token loss alone, forward + backward: plait's chunked
cross-entropy against ``F.cross_entropy(logits.float(), labels)``, each variant in fresh
processes, one thread. Memory: the peak RSS above the RSS with the logits allocated
(/proc/self/status after resetting the peak), in a process where glibc maps every
allocation of 64 KiB or more on its own (``MALLOC_MMAP_THRESHOLD_``), so that freed
buffers leave the RSS at once and the peak is that of the live tensors, not of the heap
glibc keeps; time: the median of the repeats in another process with the default allocator.

    python benchmarks/loss_memory.py [--shapes 2048x2048,4096x128256] [--dtypes bfloat16,float32]
        [--chunk-mib 2] [--repeats 3] [--pairs 2] [--compiled]

``--chunk-mib`` takes several sizes (``1,2,8``); ``--compiled`` adds the loss under
``torch.compile``, where ``plait.nn.loss.cross_entropy`` is ``F.cross_entropy`` fused by
inductor (compile time excluded).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def measure(variant: str, rows: int, vocabulary: int, dtype: str, chunk_mib: float, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    from plait.nn.loss import cross_entropy

    torch.set_num_threads(1)
    torch.manual_seed(0)
    logits = (torch.randn(rows, vocabulary) * 2).to(getattr(torch, dtype)).requires_grad_()
    labels = torch.randint(0, vocabulary, (rows,))

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if variant.endswith("F.cross_entropy"):
            return F.cross_entropy(logits.float(), labels)
        return cross_entropy(logits, labels, chunk_bytes=int(chunk_mib * 2**20))

    compiled = torch.compile(loss_fn) if variant.startswith("compiled") else loss_fn

    def step() -> None:
        compiled(logits, labels).backward()
        logits.grad = None

    step()  # compiles, and starts autograd's thread
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    step()
    peak = _status_kib("VmHWM") - before
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return {"peak_mib": round(peak / 1024, 1), "seconds": round(statistics.median(times), 4) if times else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="2048x2048,4096x128256", help="ROWSxVOCABULARY, comma-separated")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--chunk-mib", default="2", help="chunk sizes of the chunked loss, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=2, help="interleaved repeats of every variant")
    parser.add_argument("--compiled", action="store_true", help="also the loss under torch.compile")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, rows, vocabulary, dtype, chunk = json.loads(args.child)
        print(json.dumps(measure(variant, rows, vocabulary, dtype, chunk, args.repeats)))
        return
    variants = [("F.cross_entropy", 0)] + [("chunked", float(mib)) for mib in args.chunk_mib.split(",")]
    if args.compiled:  # under torch.compile plait's loss is F.cross_entropy itself
        variants.append(("compiled F.cross_entropy", 0))
    for shape in args.shapes.split(","):
        rows, vocabulary = map(int, shape.split("x"))
        for dtype in args.dtypes.split(","):
            for pair in range(args.pairs):
                for variant, chunk in variants:
                    child = json.dumps([variant, rows, vocabulary, dtype, chunk])
                    memory = _child(child, 0, {"MALLOC_MMAP_THRESHOLD_": "65536"})["peak_mib"]
                    seconds = _child(child, args.repeats, {})["seconds"]
                    name = variant if variant.endswith("F.cross_entropy") else f"{variant} {chunk:g} MiB"
                    print(json.dumps({"shape": shape, "dtype": dtype, "pair": pair, "variant": name,
                                      "peak_mib": memory, "seconds": seconds}), flush=True)


def _child(child: str, repeats: int, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", child, "--repeats", str(repeats)],
                         check=True, capture_output=True, text=True, env={**os.environ, **env}).stdout
    return json.loads(out)


if __name__ == "__main__":
    main()
