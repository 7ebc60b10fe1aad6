"""Greedy and sampled generation with caches (prefill once, then one token per step)."""

from __future__ import annotations

import torch

from .elastic import Subnet


def token_probs(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                top_p: float | None = None) -> torch.Tensor:
    """The sampling distribution [..., V] of logits [..., V] (temperature > 0, then top-k, top-p)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits.softmax(-1)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = token_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def decode_loop(logits: torch.Tensor, decode, max_new_tokens: int, temperature: float = 0.0,
                top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                generator: torch.Generator | None = None, callback=None, stop=None) -> list[torch.Tensor]:
    """The token loop shared by every runtime: ``logits`` [B, V] of the prompt's last position,
    ``decode(tokens [B]) -> logits [B, V]``. Returns the new tokens, one [B, 1] tensor per step.

    Greedy choices stay on the logits' device (no host round trip on a GPU); sampling draws on the
    CPU so that a CPU ``generator`` reproduces. Sequences that emitted ``eos_token_id`` are padded
    with it, and the loop stops when all have. ``callback(step, tokens [B])`` follows each token.
    ``stop(out) -> [B] bool`` (optional, given the tokens so far): rows that need no more tokens; the
    loop also ends when every row has stopped or emitted eos (engines.schedule's phases).
    """
    out = []
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    for step in range(max_new_tokens):
        if temperature <= 0:
            nxt = logits.argmax(-1)
        else:
            nxt = sample_next(logits.float().cpu(), temperature, top_k, top_p, generator).to(logits.device)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        out.append(nxt[:, None])
        if callback is not None:
            callback(step, nxt)
        if eos_token_id is not None and bool(done.all()):
            break
        if stop is not None and bool((stop(out) | done).all()):
            break
        if step + 1 < max_new_tokens:
            logits = decode(nxt)
    return out


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, subnet: Subnet | None = None,
             attention_mask: torch.Tensor | None = None, **sampling) -> torch.Tensor:
    """Return [B, L + new] token ids from the torch model (sampling options: see decode_loop)."""
    cache = model.new_cache()
    logits = model(input_ids, subnet=subnet, cache=cache, attention_mask=attention_mask, last_only=True)
    new = decode_loop(logits[:, -1], lambda tok: model(tok[:, None], subnet=subnet, cache=cache)[:, -1],
                      max_new_tokens, **sampling)
    return torch.cat([input_ids, *new], dim=1)
