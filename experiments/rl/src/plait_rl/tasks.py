"""Toy tasks with programmatic rewards, small enough for a debug-size model on a CPU.

A task draws prompts (text) with their expected answers and scores a completion. Prompts
end with " =" and answers start with a space, so that ``prompt + answer`` is the text the
supervised warm-start trains on (``write_warmup_file``).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str


@dataclass(frozen=True)
class DigitTask:
    """``reverse``: "reverse 3827 =" -> " 7283"; ``copy``: "copy 3827 =" -> " 3827";
    ``add``: "add 38 + 27 =" -> " 65". Each draws 2..``digits`` digits per number."""

    kind: str = "reverse"
    digits: int = 4

    def problem(self, rng: random.Random) -> Problem:
        def number() -> str:
            return "".join(rng.choice("0123456789") for _ in range(rng.randint(2, self.digits)))

        if self.kind == "add":
            a, b = number(), number()
            return Problem(f"add {a} + {b} =", f" {int(a) + int(b)}")
        digits = number()
        answer = digits[::-1] if self.kind == "reverse" else digits
        return Problem(f"{self.kind} {digits} =", f" {answer}")

    def problems(self, count: int, *, seed: int) -> list[Problem]:
        rng = random.Random(seed)
        return [self.problem(rng) for _ in range(count)]

    @staticmethod
    def reward(completion: str, answer: str) -> float:
        """1 for the exact answer; otherwise the share of the answer's characters that the
        completion has at the same place (partial credit), halved; 0 for nothing."""
        got, want = completion.strip(), answer.strip()
        if got == want:
            return 1.0
        same = sum(a == b for a, b in zip(got, want))
        return 0.5 * same / max(len(want), len(got), 1)


def write_warmup_file(task: DigitTask, path: str | Path, *, count: int, seed: int) -> Path:
    """``count`` solved problems as a JSON-lines file (``{"text": prompt + answer}``): the
    supervised warm-start's data for ``plait train --data.dataset``. The seed differs from
    the RL prompts' so the warm-start does not see them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as file:
        for problem in task.problems(count, seed=seed):
            file.write(json.dumps({"text": problem.prompt + problem.answer}) + "\n")
    return path
