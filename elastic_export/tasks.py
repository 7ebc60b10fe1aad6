"""Synthetic reasoning tasks with worked steps and exact answers: left-to-right multi-step arithmetic.

    Q: 7, +5, *2, -3
    A: 7+5=12, 12*2=24, 24-3=21. #### 21

Every intermediate value stays in 0..99, so each step is a small fact the model can learn; a long
task (6-8 operations) chains many of them, so one slip anywhere loses the answer. Short tasks have
2-3 operations. ``evaluate`` prompts with the question, decodes greedily (elastic_export.generate)
and scores the number after ``####`` by exact match. ``answer_loss`` is the teacher-forced loss of
the worked answer (nats per token): a graded signal while a small model's exact match is still ~0.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

VARIANTS = {"short": (2, 3), "long": (6, 8)}
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


def make_task(rng: random.Random, n_ops: int) -> Task:
    total = rng.randint(1, 9)
    ops, steps = [str(total)], []
    for _ in range(n_ops):
        options = []
        if total <= 90:
            options.append("+")
        if total >= 1:
            options.append("-")
        if 2 <= total <= 33:
            options.append("*")
        op = rng.choice(options)
        if op == "+":
            b = rng.randint(1, min(9, 99 - total))
            new = total + b
        elif op == "-":
            b = rng.randint(1, min(9, total))
            new = total - b
        else:
            b = rng.randint(2, min(3, 99 // total))
            new = total * b
        ops.append(f"{op}{b}")
        steps.append(f"{total}{op}{b}={new}")
        total = new
    return Task(", ".join(ops), ", ".join(steps) + ".", total)


def make_tasks(n: int, variant: str = "mixed", seed: int = 0) -> list[Task]:
    """``n`` tasks; ``variant`` is short, long, or mixed (half each)."""
    if variant not in (*VARIANTS, "mixed"):
        raise ValueError(f"unknown task variant {variant!r}")
    rng = random.Random(f"tasks-{variant}-{seed}")
    out = []
    for i in range(n):
        v = variant if variant != "mixed" else ("short", "long")[i % 2]
        lo, hi = VARIANTS[v]
        out.append(make_task(rng, rng.randint(lo, hi)))
    return out


def parse_answer(text: str) -> int | None:
    m = ANSWER.search(text.split("\n")[0])
    return int(m.group(1)) if m else None


@torch.no_grad()
def evaluate(model, tokenizer, tasks: list[Task], subnet=None, batch_size: int = 64,
             max_new_tokens: int | None = None) -> float:
    """Exact-match accuracy of greedy answers (left-padded batches, stop at a newline)."""
    from .generate import generate

    if not tasks:
        return float("nan")
    newline = tokenizer.encode("\n")
    eos = newline[0] if len(newline) == 1 else None
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    correct = 0
    for start in range(0, len(tasks), batch_size):
        batch = tasks[start:start + batch_size]
        prompts = [bos + tokenizer.encode(t.prompt) for t in batch]
        L = max(len(p) for p in prompts)
        ids = torch.full((len(batch), L), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), L), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, L - len(p):] = torch.tensor(p)
            mask[i, L - len(p):] = 1
        budget_tokens = max_new_tokens or max(len(tokenizer.encode(" " + t.steps + " #### 100\n")) for t in batch)
        out = generate(model, ids.to(model.device), budget_tokens, subnet=subnet, attention_mask=mask.to(model.device),
                       eos_token_id=eos)
        for t, row in zip(batch, out[:, L:].tolist()):
            correct += parse_answer(tokenizer.decode(row)) == t.answer
    return correct / len(tasks)


@torch.no_grad()
def answer_loss(model, tokenizer, tasks: list[Task], subnet=None, batch_size: int = 64) -> float:
    """Mean cross-entropy (nats/token) of the worked answer given the question, teacher-forced."""
    import torch.nn.functional as F

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    total, count = 0.0, 0
    for start in range(0, len(tasks), batch_size):
        rows = []
        for t in tasks[start:start + batch_size]:
            q = bos + tokenizer.encode(t.prompt)
            a = tokenizer.encode(f" {t.steps} #### {t.answer}\n")
            rows.append((q + a, len(q)))
        L = max(len(ids) for ids, _ in rows)
        ids = torch.zeros((len(rows), L), dtype=torch.long)
        target = torch.full((len(rows), L), -100, dtype=torch.long)
        for i, (r, q) in enumerate(rows):  # right padding: causal layers never see it
            ids[i, :len(r)] = torch.tensor(r)
            target[i, q - 1:len(r) - 1] = torch.tensor(r[q:])
        logits = model(ids.to(model.device), subnet=subnet)
        total += float(F.cross_entropy(logits.flatten(0, 1), target.flatten().to(logits.device), reduction="sum"))
        count += int((target != -100).sum())
    return total / max(1, count)
