"""Loss baseline of the debug run, per backend: train a short, seeded llama3 debug run and
compare its per-step losses with the stored file of the backend
(``benchmarks/loss_baselines/<backend>.json``), within that file's stated tolerance.

    python benchmarks/loss_baseline.py --backend cuda            # compare (CI)
    python benchmarks/loss_baseline.py --backend rocm --write    # store a new baseline

The run is float32 and deterministic, so one backend repeats itself to rounding; the
tolerance covers different GPUs of one backend (kernel choices) and library versions. A
change of the losses beyond it is a numerical regression, or a deliberate change whose new
baseline is committed with it. Exit status 1 on a mismatch, 2 when the backend has no
baseline yet.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

BASELINES = Path(__file__).resolve().parent / "loss_baselines"
#: The debug run: llama3 debugmodel, seeded, float32, deterministic, no checkpoints.
JOB = ["--config", "llama3_debugmodel", "--training.steps", "5", "--training.seq_len", "64",
       "--training.local_batch_size", "2", "--training.seed", "0", "--training.deterministic", "True",
       "--training.dtype", "float32", "--metrics.progress", "off", "--metrics.enable_tensorboard", "False",
       "--checkpoint.enable", "False"]  # fmt: skip
#: Absolute per-step tolerance by backend: CPU runs repeat to float32 rounding; GPU runs
#: differ by kernel choice between GPU models and library versions.
TOLERANCE = {"cpu": 1e-4, "cuda": 2e-2, "rocm": 2e-2}
#: Plugins each backend needs for its device answer.
PLUGINS = {"rocm": ["--plugins", "rocm"]}


def run_debug_job(backend: str) -> dict[int, float]:
    from plait.cli import train

    with tempfile.TemporaryDirectory() as folder:
        result = train([*JOB, *PLUGINS.get(backend, []), "--job.dump_folder", folder])
    return {int(step): float(loss) for step, loss in result.losses.items()}


def compare(baseline: dict, losses: dict[int, float]) -> list[str]:
    """The steps whose loss differs from the baseline by more than its tolerance, in words."""
    stored = {int(step): loss for step, loss in baseline["losses"].items()}
    if sorted(stored) != sorted(losses):
        return [f"steps differ: baseline {sorted(stored)}, this run {sorted(losses)}"]
    tolerance = baseline["tolerance"]
    return [f"step {step}: baseline {stored[step]:.6f}, this run {losses[step]:.6f} "
            f"(|difference| {abs(stored[step] - losses[step]):.2e} > {tolerance:g})"
            for step in sorted(stored) if abs(stored[step] - losses[step]) > tolerance]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=sorted(TOLERANCE), required=True)
    parser.add_argument("--write", action="store_true", help="store this run as the backend's baseline")
    args = parser.parse_args(argv)
    path = BASELINES / f"{args.backend}.json"
    if not args.write and not path.is_file():
        print(f"no loss baseline for {args.backend} ({path}): run `python benchmarks/loss_baseline.py --backend "
              f"{args.backend} --write` on a {args.backend} runner and commit the file", file=sys.stderr)
        return 2
    losses = run_debug_job(args.backend)
    if args.write:
        document = {"job": JOB + PLUGINS.get(args.backend, []), "tolerance": TOLERANCE[args.backend],
                    "losses": {str(step): loss for step, loss in sorted(losses.items())}}
        path.write_text(json.dumps(document, indent=1) + "\n")
        print(f"wrote {path}")
        return 0
    problems = compare(json.loads(path.read_text()), losses)
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{args.backend}: {len(losses)} steps, {'MISMATCH' if problems else 'match'} "
          f"(tolerance {TOLERANCE[args.backend]:g})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
