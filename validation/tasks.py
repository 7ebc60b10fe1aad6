"""Evaluation data for the accuracy checks: held-out text (perplexity) and exact-match tasks.

Tasks come from the training package's synthetic reasoning tasks (``training.tasks``: multi-step
arithmetic with an answer after ``####``) when it is importable, else from a small built-in copy of
the same format, so validation never depends on training being installed. Any object with
``prompt`` (str), ``answer`` (int) and ``text`` (the full worked example) is a task; pass your own
list to :func:`validation.parity.run_parity` to evaluate something else.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

ANSWER = re.compile(r"####\s*(-?\d+)")


@dataclass(frozen=True)
class Task:
    question: str
    steps: str
    answer: int

    @property
    def prompt(self) -> str:
        return f"Q: {self.question}\nA:"

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.steps} #### {self.answer}\n"


def _builtin_tasks(n: int, seed: int) -> list[Task]:
    """Left-to-right arithmetic with values kept in 0..99 (the format of training.tasks)."""
    rng = random.Random(f"validation-tasks-{seed}")
    out = []
    for _ in range(n):
        total = rng.randint(1, 9)
        ops, steps = [str(total)], []
        for _ in range(rng.randint(2, 4)):
            op = rng.choice(["+", "-"] if total > 33 else ["+", "-", "*"]) if total >= 1 else "+"
            if op == "+":
                b = rng.randint(1, min(9, 99 - total))
                new = total + b
            elif op == "-":
                b = rng.randint(1, min(9, total))
                new = total - b
            else:
                b = rng.randint(2, 3)
                new = total * b
            ops.append(f"{op}{b}")
            steps.append(f"{total}{op}{b}={new}")
            total = new
        out.append(Task(", ".join(ops), ", ".join(steps) + ".", total))
    return out


def make_tasks(n: int, seed: int = 1) -> tuple[list, str]:
    """``n`` held-out tasks and where they came from ('training.tasks' or 'builtin').

    The seed differs from training's default (0), so these are not the training examples.
    """
    try:
        from training import tasks as training_tasks

        return list(training_tasks.make_tasks(n, "mixed", seed=1000 + seed)), "training.tasks"
    except (ImportError, AttributeError, TypeError):
        return _builtin_tasks(n, seed), "builtin"


def parse_answer(text: str) -> int | None:
    m = ANSWER.search(text.split("\n")[0])
    return int(m.group(1)) if m else None


HELD_OUT_TEXT = (
    "The validation harness runs the same prompts through every backend and compares the logits. "
    "A nested checkpoint keeps one copy of the weights; each budget reads a prefix of them. "
    "Mamba layers carry a fixed-size state, attention layers a cache that grows with the context. "
    "Q: 4, +3, *2\nA: 4+3=7, 7*2=14. #### 14\n"
    "Q: 9, -2, +5, *3\nA: 9-2=7, 7+5=12, 12*3=36. #### 36\n"
)


def held_out_texts(tasks: list, extra: list[str] | None = None) -> list[str]:
    """Held-out text for perplexity: a fixed paragraph, the tasks' worked solutions and ``extra``."""
    return [HELD_OUT_TEXT] + [t.text for t in tasks] + list(extra or [])
