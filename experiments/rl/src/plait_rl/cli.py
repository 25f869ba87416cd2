"""``plait-rl toy``: the toy task end to end on one machine, with plait's own commands —
a supervised warm-start (``plait train`` on solved problems), ``plait convert`` to a
Hugging Face folder, then RL (``plait train --plugins rl --model.hf_dir``); prints the
reward curve. Options after ``--`` go to the RL run's ``plait train``."""
from __future__ import annotations

import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

#: The model of the toy run: qwen3's debug shape cut to two layers (3M parameters).
MODEL = ["--model", "qwen3", "--model.flavor", "debugmodel", "--model.args.n_layers", "2"]


@dataclass(kw_only=True)
class ToyOptions:
    """Warm-start, convert and RL on the toy task; options after -- go to the RL run's plait train."""

    workdir: str = "rl_toy"
    """Folder for the warm-start data, both runs and the converted model."""
    task: Literal["reverse", "copy", "add"] = "reverse"
    digits: int = 4
    warmup_examples: int = 4000
    warmup_steps: int = 150
    rl_steps: int = 80
    rl_lr: float = 2e-4
    group_size: int = 8
    prompts_per_step: int = 8


def toy(options: ToyOptions, rl_options: list[str] = (), model: list[str] = MODEL) -> dict[int, float]:
    """Runs the three stages (skipping a stage whose output exists); returns {step: mean reward}."""
    from plait.cli import main
    from plait.cli.commands import train
    from plait_rl.tasks import DigitTask, write_warmup_file

    work = Path(options.workdir)
    data = write_warmup_file(DigitTask(options.task, options.digits), work / "warmup.jsonl",
                             count=options.warmup_examples, seed=12345)  # fmt: skip
    hf = work / "warm_hf"
    if not (hf / "config.json").exists():
        train([*model, "--data.dataset", str(data), "--training.steps", str(options.warmup_steps),
               "--training.seq_len", "64", "--training.local_batch_size", "16", "--optimizer.lr", "3e-3",
               "--lr_scheduler.warmup_steps", "10", "--metrics.progress", "off", "--metrics.log_freq", "25",
               "--checkpoint.interval", str(options.warmup_steps), "--job.dump_folder", str(work / "warmup")])
        code = main(["convert", str(work / "warmup" / "checkpoint" / f"step-{options.warmup_steps}"), str(hf)])
        if code:
            raise SystemExit(code)
    rl_folder = work / "rl"
    train(["--model", model[1], "--model.hf_dir", str(hf), "--plugins", "rl", "--rl.task", options.task,
           "--rl.digits", str(options.digits), "--rl.group_size", str(options.group_size),
           "--training.local_batch_size", str(options.group_size * options.prompts_per_step),
           "--training.seq_len", "32", "--training.steps", str(options.rl_steps), "--optimizer.lr", str(options.rl_lr),
           "--lr_scheduler.warmup_steps", "0", "--lr_scheduler.decay_ratio", "0", "--metrics.progress", "off",
           "--metrics.log_freq", "1", "--checkpoint.interval", str(options.rl_steps),
           "--job.dump_folder", str(rl_folder), *rl_options])  # fmt: skip
    return reward_curve(rl_folder)


def reward_curve(dump_folder: str | Path, tag: str = "rl/reward") -> dict[int, float]:
    """``tag`` by step, read back from the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(dump_folder) / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


def curve_table(curve: dict[int, float], every: int = 10) -> str:
    steps = sorted(curve)
    lines = ["| steps | mean reward |", "|---|---|"]
    for start in range(0, len(steps), every):
        chunk = steps[start : start + every]
        lines.append(f"| {chunk[0]}–{chunk[-1]} | {statistics.mean(curve[s] for s in chunk):.3f} |")
    return "\n".join(lines)


def program() -> None:
    import tyro

    from plait.errors import PlaitError

    argv = sys.argv[1:]
    if not argv or argv[0] != "toy":
        print("usage: plait-rl toy [--workdir DIR] [--rl_steps N] ... [-- PLAIT TRAIN OPTIONS FOR THE RL RUN]\n"
              "  runs the toy task (warm-start, convert, RL) and prints the reward curve", file=sys.stderr)
        raise SystemExit(2)
    argv = argv[1:]
    rl_options: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, rl_options = argv[:at], argv[at + 1 :]
    options = tyro.cli(ToyOptions, args=argv, prog="plait-rl toy")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        curve = toy(options, rl_options)
    except PlaitError as error:
        print(f"plait-rl: error: {error}", file=sys.stderr)
        raise SystemExit(error.exit_code) from None
    print(curve_table(curve))
