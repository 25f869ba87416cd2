"""Where a training step's time goes: torch profiler self time by operator, split into
forward, loss, backward and optimizer, for plait (and, with ``--torchtitan-python``, for
torchtitan on the same ``vs_torchtitan`` job).

    python benchmarks/step_profile.py --job debugmodel --dtype bfloat16 [--steps 4] [--warmup 3] \
        [--torchtitan-python ~/venv-tt/bin/python] [--top 12] [--json out.json] [-- more plait options]

One thread (``--threads``). The profiled steps follow ``--warmup`` unprofiled ones. Each
operator's self time is attributed to the phase it ran in; the categories group operators
(``matmul``: mm/addmm/bmm; ``attention``: the SDPA kernels; ``casts``: copy_/_to_copy;
``optimizer``: the fused AdamW kernel; ...). The torchtitan side runs in its own
environment (``step_profile_titan.py``) and reads the same job files as ``vs_torchtitan.py``.
This module imports neither plait nor torchtitan at the top: both runners share its summary.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PHASES = ("forward", "loss", "backward", "optimizer")

#: Operator name fragments -> category, first match wins.
CATEGORIES = (
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("optimizer", ("adam", "_foreach_", "clip_grad", "norm")),
    ("loss", ("log_softmax", "nll_loss", "cross_entropy", "logsumexp")),
    ("casts", ("aten::copy_", "aten::_to_copy", "aten::to")),
    ("embedding", ("embedding",)),
    ("activation", ("silu",)),
    ("reduction", ("aten::sum", "aten::mean", "aten::rsqrt", "aten::pow")),
    ("elementwise", ("aten::mul", "aten::add", "aten::div", "aten::neg", "aten::sub", "aten::cat", "aten::where",
                     "aten::masked_fill", "aten::fill_", "aten::zero_", "aten::clone", "aten::cos", "aten::sin")),
)


def category(name: str) -> str:
    lowered = name.lower()
    for label, fragments in CATEGORIES:
        if any(lowered.startswith(f.lower()) or f.lower() in lowered for f in fragments):
            return label
    return "other"


def phase_of(event) -> str:  # noqa: ANN001 - a torch.autograd.profiler FunctionEvent
    parent = event
    while parent is not None:
        if parent.name.startswith("step/"):
            return parent.name[len("step/"):]
        parent = parent.cpu_parent
    return "other"


def summarize(prof, steps: int, top: int = 12) -> dict:  # noqa: ANN001 - a torch.profiler.profile
    """Milliseconds per step: each phase's wall time, and operator self time by phase,
    category and name."""
    phases: dict[str, float] = {}
    by_phase_category: dict[str, dict[str, float]] = {}
    by_op: dict[str, float] = {}
    by_phase_op: dict[str, dict[str, float]] = {}
    total_self = 0.0
    for event in prof.events():
        if event.name.startswith("step/"):
            phases[event.name[5:]] = phases.get(event.name[5:], 0.0) + event.cpu_time_total / 1e3 / steps
            continue
        if not event.name.startswith("aten::"):
            continue
        self_ms = event.self_cpu_time_total / 1e3 / steps
        if self_ms <= 0:
            continue
        total_self += self_ms
        phase = phase_of(event)
        cat = category(event.name)
        by_phase_category.setdefault(phase, {})
        by_phase_category[phase][cat] = by_phase_category[phase].get(cat, 0.0) + self_ms
        by_op[event.name] = by_op.get(event.name, 0.0) + self_ms
        per_op = by_phase_op.setdefault(phase, {})
        per_op[event.name] = per_op.get(event.name, 0.0) + self_ms
    categories: dict[str, float] = {}
    for per in by_phase_category.values():
        for cat, ms in per.items():
            categories[cat] = categories.get(cat, 0.0) + ms
    ops = sorted(by_op.items(), key=lambda item: -item[1])[:top]
    return {
        "phases_ms": {name: round(phases.get(name, 0.0), 2) for name in PHASES},
        "ops_self_ms": round(total_self, 2),
        "categories_ms": {k: round(v, 2) for k, v in sorted(categories.items(), key=lambda item: -item[1])},
        "by_phase_ms": {phase: {k: round(v, 2) for k, v in sorted(per.items(), key=lambda item: -item[1])}
                        for phase, per in by_phase_category.items()},
        "top_ops_ms": [[name, round(ms, 2)] for name, ms in ops],
        "top_ops_by_phase_ms": {phase: [[name, round(ms, 2)] for name, ms in sorted(per.items(), key=lambda i: -i[1])[:6]]
                                for phase, per in by_phase_op.items()},
    }


def print_summary(system: str, summary: dict, step_ms: float) -> None:
    print(f"\n== {system}: step {step_ms:.1f} ms (median, unprofiled); profiled operator self time "
          f"{summary['ops_self_ms']:.1f} ms/step")
    print("  phases (ms/step): " + ", ".join(f"{k} {v:.1f}" for k, v in summary["phases_ms"].items()))
    total = summary["ops_self_ms"] or 1.0
    print("  categories: " + ", ".join(f"{k} {v:.1f} ({100 * v / total:.0f} %)"
                                       for k, v in summary["categories_ms"].items()))
    for phase, per in summary["by_phase_ms"].items():
        print(f"  {phase:>9}: " + ", ".join(f"{k} {v:.1f}" for k, v in per.items()))
        print("             " + ", ".join(f"{name} {ms:.1f}" for name, ms in summary["top_ops_by_phase_ms"][phase]))
    print("  top operators: " + ", ".join(f"{name} {ms:.1f}" for name, ms in summary["top_ops_ms"]))


class _Regions:
    """Opens and closes ``step/<phase>`` profiler ranges from hooks that are not context managers."""

    def __init__(self) -> None:
        self.open: dict[str, object] = {}

    def enter(self, name: str) -> None:
        import torch

        region = torch.profiler.record_function(f"step/{name}")
        region.__enter__()
        self.open[name] = region

    def exit(self, name: str) -> None:
        region = self.open.pop(name, None)
        if region is not None:
            region.__exit__(None, None, None)


def plait_profile(job, extra: list[str], *, warmup: int, steps: int, top: int) -> tuple[dict, float]:  # noqa: ANN001
    import statistics
    import time

    import torch

    from plait import PLUGIN_API_VERSION, hookimpl
    from plait.cli import resolve_train_config, setup_logging
    from plait.data.batch import call_model
    from plait.train import Trainer
    from vs_torchtitan_plait import plait_argv

    regions = _Regions()
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    step_seconds: list[float] = []

    class Profiled:
        PLAIT_API_VERSION = PLUGIN_API_VERSION

        @hookimpl(wrapper=True)
        def plait_train_step(self, ctx):  # noqa: ANN001, ANN201
            if ctx.step == warmup + 1:
                prof.start()
            start = time.perf_counter()
            result = yield
            if ctx.step > 1 and not warmup < ctx.step <= warmup + steps:
                step_seconds.append(time.perf_counter() - start)
            if ctx.step == warmup + steps:
                prof.stop()
            return result

        @hookimpl
        def plait_forward_backward(self, ctx):  # noqa: ANN001, ANN201 - plait's default, in named ranges
            regions.enter("forward")
            logits = call_model(ctx.model_parts[0], ctx.inputs)
            regions.exit("forward")
            regions.enter("loss")
            loss = ctx.loss_fn(logits, ctx.labels) / ctx.grad_accumulation_steps
            regions.exit("loss")
            del logits
            regions.enter("backward")
            loss.backward()
            regions.exit("backward")
            return loss.detach()

        @hookimpl
        def plait_gradients_ready(self, ctx) -> None:  # noqa: ANN001 - clipping is in the optimizer phase
            regions.enter("optimizer")

        @hookimpl
        def plait_after_optimizer_step(self, ctx) -> None:  # noqa: ANN001
            regions.exit("optimizer")

    with tempfile.TemporaryDirectory() as assets:
        argv = plait_argv(job.with_overrides(steps=2 * warmup + steps), Path(assets), data="embedded") + extra
        resolved = resolve_train_config(argv)
        resolved.plugins.register_object(Profiled(), "step_profile")
        setup_logging(0)
        trainer = Trainer(resolved)
        try:
            trainer.train()
        finally:
            trainer.close()
    # the unprofiled steps but the first (which allocates): before and after the profiled ones
    return summarize(prof, steps, top), statistics.median(step_seconds) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="debugmodel")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--steps", type=int, default=4, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=3,
                        help="unprofiled steps before the profiled ones and as many after; all but step 1 time the step")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--torchtitan-python", default="", help="also profile torchtitan in this interpreter")
    parser.add_argument("--json", help="write the summaries to this file")
    parser.add_argument("extra", nargs="*", help="more plait train options, after --")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from vs_torchtitan_jobs import JOBS

    job = JOBS[args.job].with_overrides(dtype=args.dtype, compile=args.compile)
    results = {}
    if args.torchtitan_python:
        from vs_torchtitan import with_plait_schedule, write_assets

        with tempfile.TemporaryDirectory() as work:
            work_dir = Path(work)
            write_assets(work_dir)
            job_file = work_dir / "job.json"
            job_file.write_text(with_plait_schedule(job.with_overrides(steps=2 * args.warmup + args.steps)).to_json())
            out = work_dir / "titan.json"
            env = {**os.environ, "VS_TORCHTITAN_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads),
                   "STEP_PROFILE_WARMUP": str(args.warmup), "STEP_PROFILE_STEPS": str(args.steps),
                   "STEP_PROFILE_TOP": str(args.top)}
            subprocess.run([args.torchtitan_python, str(Path(__file__).parent / "step_profile_titan.py"),
                            str(job_file), str(work_dir), str(out)], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            results["torchtitan"] = json.loads(out.read_text())

    import torch

    torch.set_num_threads(args.threads)
    summary, step_ms = plait_profile(job, args.extra, warmup=args.warmup, steps=args.steps, top=args.top)
    results["plait"] = {"summary": summary, "step_ms": step_ms}
    print(f"job {job.name}, {job.dtype}{', compiled' if job.compile else ''}, {args.threads} thread(s), "
          f"{args.steps} profiled steps after {args.warmup}")
    for system, result in results.items():
        print_summary(system, result["summary"], result["step_ms"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
