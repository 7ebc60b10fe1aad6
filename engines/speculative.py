"""Self-speculative decoding over one weight copy: a small budget drafts, the full budget verifies.

Each round (b sequences in step; ``x`` is the last emitted token, which neither budget has consumed):

1. draft: the draft budget decodes k tokens d_1..d_k from ``x``, one step each, keeping a snapshot of
   its state after each step (its conv and SSM states are updated in place and cannot be undone);
2. verify: the verify budget feeds [x, d_1..d_k] in one forward (``engine.extend``, recording each
   Mamba layer's window) -> its own choice g_0..g_k after each of these tokens;
3. accept the longest prefix with d_j = g_{j-1}, the same m for every row (the minimum over the
   unfinished rows: every row's first m + 1 verify choices are then its own verify-greedy tokens, and
   the rows stay aligned, so caches need no per-row lengths); emit g_0..g_m;
4. undo the rest: the verifier keeps m + 1 of the k + 1 tokens (``engine.rewind``: KV truncated, conv
   and SSM states recomputed from the recorded window), the drafter restores its snapshot after
   d_m and will next consume g_m (after d_k too when all k were accepted).

Greedy output is the verify budget's own greedy decode, token for token (up to float rounding: the
verify forward and a decode step sum in different orders). With ``temperature > 0`` the standard
acceptance rule (accept d with probability min(1, p(d) / q(d)), else draw from the normalized
max(0, p - q)) keeps the output distributed exactly as the verify budget's sampling.

``draft_len="auto"`` (or ``adaptive=True``) adapts k from the acceptance: +1 after a round that accepted
every draft, -1 after one that did not, within [1, max_draft_len] (transformers' assisted
generation uses a similar heuristic schedule).

Engines provide ``fork``, ``prefill``, ``decode``, ``extend(ids, record)``, ``rewind(keep)``, ``snapshot``
and ``restore`` (engines.torch_engine, engines.ort_engine).
"""

from __future__ import annotations

import torch

from elastic_export.errors import BudgetError
from elastic_export.generate import token_probs


def _check(engine, draft: str, verify: str) -> None:
    for name in (draft, verify):
        if name not in engine.budgets:
            raise BudgetError(f"unknown budget {name!r}", field="draft", fix=f"use one of {engine.budgets}")
    for attr in ("fork", "extend", "rewind", "snapshot", "restore"):
        if not hasattr(engine, attr):
            raise BudgetError(f"{type(engine).__name__} cannot run two budgets in one generation (no {attr})",
                              field="draft", fix="use the torch or the ONNX Runtime engine")


def _accept_greedy(drafts: torch.Tensor, vlogits: torch.Tensor, active: torch.Tensor):
    """drafts [b, k], vlogits [b, k+1, V] -> (accepted per row [b], the verify choices g [b, k+1])."""
    g = vlogits.argmax(-1)
    ok = (drafts == g[:, :-1]).long().cumprod(1).sum(1)
    return torch.where(active, ok, drafts.shape[1]), g


def _accept_sampled(drafts, q, vlogits, active, sampling, generator):
    """The standard rule per row. q [b, k, V] draft probabilities. Returns (accepted [b], a function
    giving each row's token at position m for a chosen m)."""
    p = token_probs(vlogits, sampling["temperature"], sampling.get("top_k"), sampling.get("top_p"))  # [b,k+1,V]
    b, k = drafts.shape
    pd = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
    qd = q.gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand(b, k, generator=generator)
    ok = (u * qd <= pd).long().cumprod(1).sum(1)
    ok = torch.where(active, ok, k)

    def token_at(m: int) -> torch.Tensor:
        if m == k:
            dist = p[:, k]
        else:
            resid = (p[:, m] - q[:, m]).clamp(min=0)
            norm = resid.sum(-1, keepdim=True)
            dist = torch.where(norm > 0, resid / norm.clamp(min=1e-30), p[:, m])
        draw = torch.multinomial(dist, 1, generator=generator).squeeze(-1)
        return draw if m == k else torch.where(ok > m, drafts[:, m], draw)

    return ok, token_at


@torch.no_grad()
def speculative_generate(engine, input_ids, max_new_tokens: int, draft: str, verify: str | None = None,
                         draft_len: int | str = 4, max_draft_len: int = 8, attention_mask=None,
                         eos_token_id: int | None = None, callback=None, temperature: float = 0.0,
                         top_k: int | None = None, top_p: float | None = None,
                         generator: torch.Generator | None = None, stats: dict | None = None) -> torch.Tensor:
    """[b, l] -> [b, l + new] token ids: the ``verify`` budget's generation (default: the largest),
    drafted by ``draft``. ``draft_len``: k, or "auto" (adaptive, starting at 4). ``stats`` (a dict, filled
    in): rounds, drafted, accepted (per row, before the batch minimum), acceptance, emitted, and the
    draft lengths used. ``callback(step, tokens [b])`` follows each emitted token."""
    verify = verify or engine.budgets[0]
    _check(engine, draft, verify)
    adaptive = draft_len == "auto"
    k = 4 if adaptive else int(draft_len)
    if k < 1:
        raise BudgetError(f"draft length {k} < 1", field="draft_len", fix="use 1 or more, or 'auto'")
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    greedy = temperature <= 0
    input_ids = torch.as_tensor(input_ids)
    drafter, verifier = engine.fork(), engine.fork()
    drafter.set_budget(draft)
    verifier.set_budget(verify)
    st = dict(rounds=0, drafted=0, accepted=0, emitted=0, draft_lens=[])

    vl = torch.as_tensor(verifier.prefill(input_ids, attention_mask, last_only=True))
    drafter.prefill(input_ids, attention_mask, last_only=True)
    b = input_ids.shape[0]
    done = torch.zeros(b, dtype=torch.bool)
    out: list[torch.Tensor] = []

    def emit(tokens: torch.Tensor) -> None:  # tokens [b, n], in order
        nonlocal done
        for j in range(tokens.shape[1]):
            t = tokens[:, j].cpu()
            if eos_token_id is not None:
                t = torch.where(done, torch.full_like(t, eos_token_id), t)
                done = done | (t == eos_token_id)
            out.append(t[:, None])
            if callback is not None:
                callback(len(out) - 1, t)

    first = vl.argmax(-1) if greedy else \
        torch.multinomial(token_probs(vl.float().cpu(), temperature, top_k, top_p), 1, generator=generator)[:, 0]
    emit(first[:, None])
    x = out[-1][:, 0]
    feed = [x]  # tokens the drafter has yet to consume
    while len(out) < max_new_tokens and not (eos_token_id is not None and bool(done.all())):
        kk = min(k, max_new_tokens - len(out) - 1)
        if kk == 0:  # one token left: a plain verify step
            lg = torch.as_tensor(verifier.decode(x))
            emit((lg.argmax(-1) if greedy else torch.multinomial(
                token_probs(lg.float().cpu(), temperature, top_k, top_p), 1, generator=generator)[:, 0])[:, None])
            break
        # 1. draft kk tokens, a snapshot after each step but the last
        for t in feed[:-1]:
            drafter.decode(t)
        lg = torch.as_tensor(drafter.decode(feed[-1]))
        drafts, qs, snaps = [], [], []
        for j in range(kk):
            if greedy:
                d = lg.argmax(-1)
            else:
                q = token_probs(lg.float().cpu(), temperature, top_k, top_p)
                d = torch.multinomial(q, 1, generator=generator)[:, 0]
                qs.append(q)
            drafts.append(d.cpu())
            if j < kk - 1:
                snaps.append(drafter.snapshot())
                lg = torch.as_tensor(drafter.decode(d))
        D = torch.stack(drafts, 1)  # [b, kk]
        # 2. verify [x, d_1..d_kk] in one forward
        vlogits = torch.as_tensor(verifier.extend(torch.cat([x[:, None], D], 1), record=True)).float().cpu()
        active = ~done
        if greedy:
            ok, g = _accept_greedy(D, vlogits, active)
            m = int(ok.min())
            new = g[:, :m + 1]
        else:
            ok, token_at = _accept_sampled(D, torch.stack(qs, 1), vlogits, active, sampling, generator)
            m = int(ok.min())
            new = torch.cat([D[:, :m], token_at(m)[:, None]], 1)
        # 3. undo what was not accepted
        if m < kk:
            verifier.rewind(m + 1)
            if m < kk - 1:
                drafter.restore(snaps[m])
            feed = [new[:, -1]]
        else:
            feed = [D[:, -1], new[:, -1]]
        st["rounds"] += 1
        st["drafted"] += kk * int(active.sum())
        st["accepted"] += int(ok[active].clamp(max=kk).sum())
        st["draft_lens"].append(kk)
        emit(new)
        x = out[-1][:, 0]
        if adaptive:
            k = min(k + 1, max_draft_len) if m == kk else max(k - 1, 1)
    del out[max_new_tokens:]
    st["emitted"] = len(out)
    st["acceptance"] = st["accepted"] / st["drafted"] if st["drafted"] else float("nan")
    if stats is not None:
        stats.update(st)
    return torch.cat([input_ids, *out], dim=1)
