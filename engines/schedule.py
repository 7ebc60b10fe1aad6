"""Elastic budget control: one generation in phases, each with its own budget, over one weight copy.

A phase runs its budget until a stop condition (a token sequence such as the answer marker ``####``
of elastic_export.tasks or ``</think>``, included in the output; a token count; or eos), then the next
phase's budget takes over. The caches of two budgets have different shapes, so a switch re-prefills
what the sequence holds so far with the new budget, in one prefill:

- by default one prefill of [prompt | generated]; rows that stopped at different lengths are
  left-padded again, so the batch stays one call;
- with ``prompt_cache`` (a dict kept by the caller across generations): the new budget's prefill of
  the prompt is computed once and kept (``engine.snapshot``), and a switch only feeds the generated
  suffix (``engine.extend``) from it. That needs every row's suffix to have the same length (always
  true for one sequence); otherwise the switch falls back to the full prefill.

A phase ends for the whole batch when every row has stopped; a row that stopped early keeps being
decoded with that budget meanwhile, and those tokens are dropped (``callback`` still sees them).
``stats["switches"]`` records each switch: its cost (seconds, tokens prefilled, whether the kept prompt
prefill was reused) and each row's tokens before it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from elastic_export.errors import BudgetError
from elastic_export.generate import decode_loop


@dataclass(frozen=True)
class Phase:
    """``budget`` until one of ``until`` (token-id sequences) has just been emitted, or ``max_tokens``
    tokens (None: no limit). The last phase runs to the end of the generation."""
    budget: str
    until: tuple[tuple[int, ...], ...] = field(default=())
    max_tokens: int | None = None


def stop_index(tokens: list[int], phase: Phase) -> int | None:
    """Tokens of ``tokens`` (one row's output of this phase) up to and including its stop, or None."""
    end = len(tokens) if phase.max_tokens is None else min(len(tokens), phase.max_tokens)
    for i in range(1, end + 1):
        if any(len(s) <= i and tuple(tokens[i - len(s):i]) == tuple(s) for s in phase.until):
            return i
    return phase.max_tokens if phase.max_tokens is not None and len(tokens) >= phase.max_tokens else None


def _left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, L - len(r):] = 1
    return ids, mask


@torch.no_grad()
def scheduled_generate(engine, input_ids, max_new_tokens: int, phases: list[Phase], attention_mask=None,
                       eos_token_id: int | None = None, pad_token_id: int = 0, callback=None,
                       prompt_cache: dict | None = None, stats: dict | None = None, **sampling) -> torch.Tensor:
    """[b, l] -> [b, l + max_new_tokens] token ids (rows that emitted eos are padded with it).
    Sampling options: elastic_export.generate.decode_loop."""
    if not phases:
        raise BudgetError("no phases", field="phases", fix="give at least one Phase(budget)")
    for ph in phases:
        if ph.budget not in engine.budgets:
            raise BudgetError(f"unknown budget {ph.budget!r}", field="budget", fix=f"use one of {engine.budgets}")
    input_ids = torch.as_tensor(input_ids)
    b, l = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else torch.as_tensor(attention_mask)
    prompts = [input_ids[i][mask[i].bool()].tolist() for i in range(b)]
    gen: list[list[int]] = [[] for _ in range(b)]  # kept tokens per row
    finished = [False] * b  # emitted eos
    switches = []
    decode = lambda tok: torch.as_tensor(engine.decode(tok))  # noqa: E731
    for n, ph in enumerate(phases):
        last = n == len(phases) - 1
        left = [max_new_tokens - len(g) for g in gen]
        if max(left) <= 0 or all(finished):
            break
        engine.set_budget(ph.budget)
        t0 = time.perf_counter()
        if n == 0:
            logits = torch.as_tensor(engine.prefill(input_ids, attention_mask, last_only=True))
        else:
            logits, how = _switch(engine, input_ids, attention_mask, prompts, gen, pad_token_id, prompt_cache)
            switches.append(dict(to=ph.budget, after=[len(g) for g in gen], seconds=time.perf_counter() - t0, **how))

        def stopped(out, ph=ph, last=last):
            if last:
                return torch.zeros(b, dtype=torch.bool)
            rows = torch.cat(out, 1).tolist()
            return torch.tensor([finished[i] or len(r) >= left[i] or stop_index(r, ph) is not None
                                 for i, r in enumerate(rows)])

        new = decode_loop(logits, decode, max(left), eos_token_id=eos_token_id, callback=callback, stop=stopped,
                          **sampling)
        rows = torch.cat(new, 1).tolist()
        for i, r in enumerate(rows):
            if finished[i]:
                continue
            r = r[:left[i]]
            cut = None if last else stop_index(r, ph)
            r = r[:cut] if cut is not None else r
            if eos_token_id is not None and eos_token_id in r:
                r = r[:r.index(eos_token_id) + 1]
                finished[i] = True
            gen[i] += r
    if stats is not None:
        stats["switches"] = switches
    fill = eos_token_id if eos_token_id is not None else pad_token_id
    out = torch.full((b, max_new_tokens), fill, dtype=torch.long)
    for i, g in enumerate(gen):
        out[i, :len(g)] = torch.tensor(g[:max_new_tokens], dtype=torch.long)
    return torch.cat([input_ids, out], dim=1)


def _switch(engine, input_ids, attention_mask, prompts, gen, pad, prompt_cache):
    """Prefill the current budget with [prompt | generated] -> (logits [b, V] of the last token, how)."""
    suffix = {len(g) for g in gen}
    if prompt_cache is not None and len(suffix) == 1 and suffix != {0}:
        key = (engine.budget, input_ids.numpy().tobytes(), None if attention_mask is None else
               torch.as_tensor(attention_mask).numpy().tobytes())
        hit = key in prompt_cache
        if hit:
            engine.restore(prompt_cache[key])
        else:
            engine.prefill(input_ids, attention_mask, last_only=True)
            prompt_cache[key] = engine.snapshot()
        logits = torch.as_tensor(engine.extend(torch.tensor(gen, dtype=torch.long)))[:, -1]
        return logits, dict(tokens=suffix.pop(), reused_prompt=hit, prompt_prefilled=not hit)
    ids, mask = _left_pad([p + g for p, g in zip(prompts, gen)], pad)
    logits = torch.as_tensor(engine.prefill(ids, mask if bool((mask == 0).any()) else None, last_only=True))
    return logits, dict(tokens=int(mask.sum(1).max()), reused_prompt=False, prompt_prefilled=True)
