"""What validation and the profiler cost, against a training step, side by side in one run.

    python benchmarks/evaluation_overhead.py [--config llama3_debugmodel] [--steps 12] [--repeats 3]
        [--validation-steps 4] [-- extra plait options]

Three runs of the same job, alternated ``--repeats`` times in this process (each going
first in turn): plain; with
validation after every step (``--validation.steps`` batches of the training's size, from
the held-out share); with the profiler recording every step after the first two. It
prints the median steady-state step time of each, the median time of one validation pass
and of one validation batch against a training step, and the profiler's overhead on a step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile


from plait import hookimpl


class ValidationTimes:
    PLAIT_API_VERSION = 1

    def __init__(self) -> None:
        self.seconds: list[float] = []

    @hookimpl
    def plait_log_metrics(self, step, metrics, config):  # noqa: ANN001
        if "validation/seconds" in metrics:
            self.seconds.append(metrics["validation/seconds"])


def run(argv: list[str]) -> tuple[float, list[float]]:
    """Steady-state seconds per step (the first two left out) and the validation passes' seconds."""
    from plait.cli.config_parsing import resolve_train_config
    from plait.train import Trainer

    times = ValidationTimes()
    job = resolve_train_config(argv)
    job.plugins.register_object(times, "validation_times")
    trainer = Trainer(job)
    try:
        result = trainer.train()
    finally:
        trainer.close()
    return result.summary["step_seconds"], times.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="llama3_debugmodel")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--validation-steps", type=int, default=4)
    parser.add_argument("extra", nargs="*", help="more plait train options, after --")
    args = parser.parse_args()

    step: dict[str, list[float]] = {"plain": [], "validation": [], "profiler": []}
    passes: list[float] = []
    kinds = list(step)
    for repeat in range(args.repeats):
        for kind in kinds[repeat % 3:] + kinds[:repeat % 3]:  # each kind goes first in turn
            with tempfile.TemporaryDirectory() as dump:
                argv = ["--config", args.config, "--training.steps", str(args.steps), "--checkpoint.enable", "False",
                        "--metrics.enable_tensorboard", "False", "--metrics.progress", "off",
                        "--metrics.log_freq", "1", "--data.held_out_share", "0.05", "--job.dump_folder", dump,
                        *args.extra]  # fmt: skip
                if kind == "validation":
                    argv += ["--validation.interval", "1", "--validation.steps", str(args.validation_steps)]
                if kind == "profiler":
                    argv += ["--profiling.enable", "True", "--profiling.skip_steps", "1", "--profiling.warmup_steps",
                             "1", "--profiling.active_steps", "1", "--profiling.repeat", "0"]  # fmt: skip
                seconds, validation = run(argv)
                step[kind].append(seconds)
                passes += validation[1:]  # the first pass builds the held-out loader
    median = {kind: statistics.median(values) for kind, values in step.items()}
    validation_pass = statistics.median(passes)
    print(json.dumps({
        "config": args.config, "steps": args.steps, "repeats": args.repeats, "extra": args.extra,
        "step_seconds": {kind: round(value, 4) for kind, value in median.items()},
        "validation_pass_seconds": round(validation_pass, 4),
        "validation_pass_vs_train_step": round(validation_pass / median["plain"], 3),
        "validation_batch_vs_train_step": round(validation_pass / args.validation_steps / median["plain"], 3),
        "profiler_step_vs_plain_step": round(median["profiler"] / median["plain"], 3),
    }, indent=2))


if __name__ == "__main__":
    main()
