"""Generation over any engine (duck-typed: ``prefill(ids, mask, last_only=True)`` and ``decode(tokens)``)."""

from __future__ import annotations

import torch

from elastic_export.generate import sample_next


def generate(engine, input_ids, max_new_tokens: int, attention_mask=None, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
             generator: torch.Generator | None = None, callback=None) -> torch.Tensor:
    """Return [b, l + new] token ids; ``callback(step, tokens [b])`` after each new token."""
    input_ids = torch.as_tensor(input_ids)
    logits = torch.as_tensor(engine.prefill(input_ids, attention_mask, last_only=True))
    out = [input_ids]
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        out.append(nxt[:, None])
        if callback is not None:
            callback(step, nxt)
        if eos_token_id is not None and bool(done.all()):
            break
        if step + 1 < max_new_tokens:
            logits = torch.as_tensor(engine.decode(nxt))
    return torch.cat(out, dim=1)
