"""Generation caches: per layer a conv state, an SSM state (float32 always) or a KV cache.

Shapes (b batch, C conv channels of the budget = h*p + 2*G*N, K conv kernel):
    conv [b, C, K-1]      the last K-1 inputs of the depthwise conv (as ONNX CausalConvWithState)
    ssm  [b, h, p, n]     float32 in every precision (a bf16 state destroys long prefills)
    k, v [b, nkv, T, hd]  preallocated, grown by doubling; ``length`` tokens are valid
``key_mask`` [b, T] marks real (non-padding) positions, so decode steps after a left-padded
prefill keep ignoring the padding.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append [b, nkv, l, hd] and return views of all cached keys and values."""
        b, nkv, l, hd = k.shape
        need = self.length + l
        if self.k is None or need > self.k.shape[2]:
            cap = max(need, 2 * (0 if self.k is None else self.k.shape[2]), 64)
            nk = k.new_empty(b, nkv, cap, hd)
            nv = v.new_empty(b, nkv, cap, hd)
            if self.k is not None:
                nk[:, :, :self.length] = self.k[:, :, :self.length]
                nv[:, :, :self.length] = self.v[:, :, :self.length]
            self.k, self.v = nk, nv
        self.k[:, :, self.length:need] = k
        self.v[:, :, self.length:need] = v
        self.length = need
        return self.k[:, :, :need], self.v[:, :, :need]


class InferenceCache:
    """All layers' states for one batch of sequences. Layers fill their entry on first use."""

    def __init__(self, num_layers: int):
        self.conv: list[torch.Tensor | None] = [None] * num_layers
        self.ssm: list[torch.Tensor | None] = [None] * num_layers
        self.kv: list[KVCache] = [KVCache() for _ in range(num_layers)]
        self.seen = 0  # tokens processed so far
        self.key_mask: torch.Tensor | None = None  # [b, seen] bool, None when nothing is padded

    def extend_mask(self, attention_mask: torch.Tensor | None, b: int, l: int, device) -> torch.Tensor | None:
        """Record the new tokens' padding mask; return the mask over all keys [b, seen + l] or None."""
        if attention_mask is not None:
            attention_mask = attention_mask.to(device=device, dtype=torch.bool)
            if attention_mask.shape[1] == self.seen + l:  # caller passed the mask over all tokens
                new = attention_mask[:, self.seen:]
            elif attention_mask.shape[1] == l:
                new = attention_mask
            else:
                raise ValueError(f"attention_mask has {attention_mask.shape[1]} columns; expected {l} "
                                 f"(new tokens) or {self.seen + l} (all tokens)")
            if bool(new.all()) and self.key_mask is None:
                new = None
        else:
            new = None
        if new is None and self.key_mask is None:
            return None
        if new is None:
            new = torch.ones(b, l, dtype=torch.bool, device=device)
        old = self.key_mask if self.key_mask is not None else torch.ones(b, self.seen, dtype=torch.bool,
                                                                         device=device)
        self.key_mask = torch.cat([old, new], dim=1)
        return self.key_mask
