"""Evaluation data for the accuracy checks: held-out text (perplexity) and exact-match tasks.

Tasks are the synthetic reasoning tasks of :mod:`elastic_export.tasks` (multi-step arithmetic with
an answer after ``####``), the ones training evaluates on, drawn with another seed. Any object with
``prompt`` (str), ``answer`` (int) and ``text`` (the full worked example) is a task; pass your own
list to :func:`validation.parity.run_parity` to evaluate something else.
"""

from __future__ import annotations

from elastic_export.tasks import Task, parse_answer  # noqa: F401  (re-exported for the harness)
from elastic_export.tasks import make_tasks as _make_tasks


def make_tasks(n: int, seed: int = 1) -> tuple[list[Task], str]:
    """``n`` held-out tasks and where they came from.

    The seed differs from training's default (0), so these are not the training examples.
    """
    return list(_make_tasks(n, "mixed", seed=1000 + seed)), "elastic_export.tasks"


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
