"""Accuracy parity: every backend against the float32 elastic forward, budget by budget.

For each budget, on the same inputs (:class:`EvalData`):
1. prefill logits of held-out rows [B, L]: max / mean |logit - reference|, top-1 agreement,
   perplexity (next-token cross-entropy over the rows);
2. teacher-forced decode: prefill the first ``decode_prefix`` tokens, then feed the following
   tokens one at a time; every decode step's logits against the reference prefill logits at the
   same position (a decode graph that loses its state fails here);
3. exact-match accuracy on the synthetic tasks (greedy answers, batched by prompt length);
4. greedy-generation agreement: N greedy tokens per prompt against the reference's tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from elastic_export.errors import ConfigError

from . import tasks as task_lib
from .backends import Backend
from .thresholds import check


@dataclass
class EvalData:
    rows: torch.Tensor  # [B, L] held-out token rows (perplexity, logit errors)
    decode_prefix: int  # tokens prefilled before the teacher-forced decode steps
    decode_steps: int
    tasks: list  # objects with .prompt and .answer
    task_source: str
    prompts: torch.Tensor  # [P, Lp] prompts for greedy agreement
    greedy_tokens: int
    tokenizer: object = field(repr=False, default=None)


def make_eval_data(tokenizer, vocab_size: int, n_tasks: int = 8, seq_len: int = 64, n_rows: int = 4,
                   n_prompts: int = 4, greedy_tokens: int = 16, decode_steps: int = 8,
                   extra_text: list[str] | None = None) -> EvalData:
    """Held-out rows, tasks and prompts from the tokenizer; deterministic."""
    tasks, source = task_lib.make_tasks(n_tasks)
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    stream: list[int] = []
    for text in task_lib.held_out_texts(tasks, extra_text):
        stream += bos + tokenizer.encode(text)
    while len(stream) < n_rows * seq_len:
        stream += stream
    if max(stream) >= vocab_size:
        raise ConfigError(f"the tokenizer produces ids up to {max(stream)}, the model's vocabulary has {vocab_size}",
                          field="vocab_size", fix="validate with the checkpoint's own tokenizer (tokenizer/)")
    rows = torch.tensor(stream[:n_rows * seq_len]).view(n_rows, seq_len)
    plen = min(16, seq_len)
    prompts = torch.stack([torch.tensor(stream[i * 37 % (len(stream) - plen):][:plen]) for i in range(n_prompts)])
    decode_steps = min(decode_steps, seq_len - 2)
    return EvalData(rows, seq_len - decode_steps, decode_steps, tasks, source, prompts, greedy_tokens, tokenizer)


# ---- the measurements ---------------------------------------------------------------------------

def perplexity(logits: torch.Tensor, rows: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy) of logits [B, L, V] over rows [B, L]."""
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), rows[:, 1:].reshape(-1))
    return math.exp(ce.item())


def task_accuracy(backend: Backend, data: EvalData) -> float:
    """Exact-match accuracy of greedy answers; prompts of equal length share a batch (no padding)."""
    tok = data.tokenizer
    if not data.tasks or tok is None:
        return float("nan")
    bos = [tok.bos_token_id] if getattr(tok, "bos_token_id", None) is not None else []
    groups: dict[int, list] = {}
    for t in data.tasks:
        ids = bos + tok.encode(t.prompt)
        groups.setdefault(len(ids), []).append((ids, t))
    correct = 0
    for items in groups.values():
        ids = torch.tensor([i for i, _ in items])
        n = max(len(tok.encode(f" {t.steps} #### {t.answer}\n")) for _, t in items) if hasattr(items[0][1], "steps") \
            else 24
        out = backend.generate(ids, n)[:, ids.shape[1]:]
        for row, (_, t) in zip(out.tolist(), items):
            correct += task_lib.parse_answer(tok.decode(row)) == t.answer
    return correct / len(data.tasks)


def greedy_agreement(tokens: torch.Tensor, ref_tokens: torch.Tensor) -> float:
    """Mean over prompts of (length of the prefix equal to the reference) / N, tokens [P, N]."""
    same = (tokens == ref_tokens).int()
    prefix = same.cumprod(dim=1).sum(dim=1).float()
    return (prefix / tokens.shape[1]).mean().item()


@torch.no_grad()
def measure(backend: Backend, budget: str, data: EvalData, with_tasks: bool = True) -> dict:
    """Raw outputs of one backend on one budget (logits, decode logits, ppl, accuracy, greedy tokens)."""
    backend.set_budget(budget)
    logits = backend.prefill(data.rows)
    P = data.decode_prefix
    steps = [backend.prefill(data.rows[:, :P])[:, -1]]
    for s in range(data.decode_steps):
        steps.append(backend.decode(data.rows[:, P + s:P + s + 1])[:, -1])
    greedy = backend.generate(data.prompts, data.greedy_tokens)[:, data.prompts.shape[1]:]
    return {"logits": logits, "decode_logits": torch.stack(steps, dim=1),  # [B, 1 + steps, V]
            "ppl": perplexity(logits, data.rows), "task_acc": task_accuracy(backend, data) if with_tasks
            else float("nan"), "greedy": greedy}


def compare(out: dict, ref: dict, data: EvalData) -> dict[str, float]:
    """Parity metrics of one backend's outputs against the reference outputs."""
    P = data.decode_prefix
    ref_dec = ref["logits"][:, P - 1:P + data.decode_steps]  # positions the decode steps predict from
    d_pre = (out["logits"] - ref["logits"]).abs()
    d_dec = (out["decode_logits"] - ref_dec).abs()
    top1 = torch.cat([(out["logits"].argmax(-1) == ref["logits"].argmax(-1)).flatten(),
                      (out["decode_logits"].argmax(-1) == ref_dec.argmax(-1)).flatten()]).float().mean()
    return {
        "abs_logit": max(d_pre.max().item(), d_dec.max().item()),
        "mean_abs_logit": torch.cat([d_pre.flatten(), d_dec.flatten()]).mean().item(),
        "prefill_max_abs": d_pre.max().item(),
        "decode_max_abs": d_dec.max().item(),
        "top1": top1.item(),
        "ppl": out["ppl"],
        "ppl_ref": ref["ppl"],
        "ppl_rel_delta": abs(out["ppl"] - ref["ppl"]) / ref["ppl"],
        "task_acc": out["task_acc"],
        "task_acc_ref": ref["task_acc"],
        "task_delta": abs(out["task_acc"] - ref["task_acc"]),
        "greedy": greedy_agreement(out["greedy"], ref["greedy"]),
    }


def run_parity(reference: Backend | None, backends: list, data: EvalData, limits: dict[str, dict[str, float]],
               budgets: list[str] | None = None, with_tasks: bool = True, progress: bool = True,
               refs: dict | None = None) -> dict:
    """Every backend x budget against the reference. Returns {"reference": {budget: {...}}, "rows": [...],
    "refs": the reference's raw outputs per budget}; ``refs`` from an earlier call replaces running the
    reference (``reference`` may then be None).

    ``backends``: Backend objects, or :class:`validation.backends.Lazy` ones, each built when its turn
    comes and closed after its last budget (one backend in memory at a time); a Lazy that fails to
    build fails every row, and one named :data:`~validation.backends.TWIN` with no ``make`` (the
    reference's own computation) is judged on the reference's outputs instead of running them again.
    Each row: backend, budget, precision, metrics, ``failed`` (list of failed checks), ``passed``.
    """
    from tqdm.auto import tqdm

    from .backends import Lazy, release_memory

    budgets = budgets or list(reference.budgets)
    rows = []
    bar = tqdm(total=len(budgets) * ((refs is None) + len(backends)), desc="parity", unit="run", disable=not progress,
               leave=False)
    if refs is None:
        refs = {}
        for budget in budgets:
            bar.set_postfix_str(f"reference {budget}")
            refs[budget] = measure(reference, budget, data, with_tasks)
            bar.update()
    for item in backends:
        name = item.name
        precision = item.precision
        if isinstance(item, Lazy) and item.make is None:  # the reference's twin: its outputs are the reference's
            for budget in budgets:
                m = compare(refs[budget], refs[budget], data)
                failed = check(m, limits[precision])
                rows.append({"backend": name, "budget": budget, "precision": precision, "metrics": m,
                             "failed": failed, "passed": not failed})
                bar.update()
            continue
        if isinstance(item, Lazy):
            bar.set_postfix_str(f"loading {name}")
            try:
                be = item.make()
            except Exception as e:  # an artefact that does not even load fails validation, it does not crash it
                msg = f"could not load: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                rows += [{"backend": name, "budget": b, "precision": precision, "metrics": {}, "failed": [msg],
                          "passed": False} for b in budgets]
                bar.update(len(budgets))
                continue
        else:
            be = item
        try:
            for budget in budgets:
                bar.set_postfix_str(f"{name} {budget}")
                bar.update()
                if budget not in be.budgets:
                    rows.append({"backend": name, "budget": budget, "precision": be.precision, "metrics": {},
                                 "failed": [f"budget missing from {name}"], "passed": False})
                    continue
                try:
                    m = compare(measure(be, budget, data, with_tasks), refs[budget], data)
                    failed = check(m, limits[be.precision])
                except Exception as e:  # a backend that crashes fails its row; the report says why
                    m, failed = {}, [f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]]
                rows.append({"backend": name, "budget": budget, "precision": be.precision, "metrics": m,
                             "failed": failed, "passed": not failed})
        finally:
            if isinstance(item, Lazy):
                be.close()
                del be
                release_memory()
    bar.close()
    reference_summary = {b: {"ppl": r["ppl"], "loss": math.log(r["ppl"]), "task_acc": r["task_acc"]}
                         for b, r in refs.items()}
    return {"reference": reference_summary, "rows": rows, "refs": refs}
