"""Generation over any engine (duck-typed: ``prefill(ids, mask, last_only=True)`` and ``decode(tokens)``)."""

from __future__ import annotations

import torch

from elastic_export.generate import decode_loop


def generate(engine, input_ids, max_new_tokens: int, attention_mask=None, **sampling) -> torch.Tensor:
    """Return [b, l + new] token ids (sampling options and ``callback``: elastic_export.generate.decode_loop)."""
    input_ids = torch.as_tensor(input_ids)
    logits = torch.as_tensor(engine.prefill(input_ids, attention_mask, last_only=True))
    new = decode_loop(logits, lambda tok: torch.as_tensor(engine.decode(tok)), max_new_tokens, **sampling)
    return torch.cat([input_ids, *new], dim=1)
