"""Generation caches: per layer a conv state, an SSM state (float32 always) or a KV cache.

Shapes (b batch, C conv channels of the budget = h*p + 2*G*N, K conv kernel):
    conv [b, C, K-1]      the last K-1 inputs of the depthwise conv (as ONNX CausalConvWithState)
    ssm  [b, h, p, n]     float32 in every precision (a bf16 state destroys long prefills)
    k, v [b, nkv, T, hd]  preallocated, grown by doubling; ``length`` tokens are valid
``key_mask`` [b, T] marks real (non-padding) positions, so decode steps after a left-padded
prefill keep ignoring the padding.

``InferenceCache.record()`` (off by default): each Mamba layer records the inputs of
the forward's new tokens, so that ``rewind`` can keep a prefix of them. SSM and conv states cannot be
rolled back like a KV cache; this is how a rejected speculative draft is undone without a second forward.

``StepState`` holds the same states for the one-token decode step (model.decode_step), updated in
place: the torch engine takes a prefill's cache as it is (dynamic), or copies it into buffers
preallocated once at a fixed size (static: torch.compile, CUDA graphs).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .ssd import ssd_prefix_state


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


class MambaWindow(NamedTuple):
    """A Mamba layer's record of one forward's l new tokens (the last forward only)."""
    x_seq: torch.Tensor  # [b, K-1+l, h, p] conv inputs of x: the K-1 past ones, then the l new ones
    bc_seq: torch.Tensor  # [b, K-1+l, 2GN] the same for B | C
    ssm0: torch.Tensor | None  # [b, h, p, n] float32 state before the window (None: zeros)
    x: torch.Tensor  # [b, l, h, p] after the conv and its activation
    dt: torch.Tensor  # [b, l, h] discretized
    A: torch.Tensor  # [h]
    B: torch.Tensor  # [b, l, g, n]
    head_order: str


class InferenceCache:
    """All layers' states for one batch of sequences. Layers fill their entry on first use."""

    def __init__(self, num_layers: int):
        self.conv: list[torch.Tensor | None] = [None] * num_layers
        self.ssm: list[torch.Tensor | None] = [None] * num_layers
        self.kv: list[KVCache] = [KVCache() for _ in range(num_layers)]
        self.seen = 0  # tokens processed so far
        self.key_mask: torch.Tensor | None = None  # [b, seen] bool, None when nothing is padded
        self.windows: list[MambaWindow | None] | None = None  # set by record(), filled by the next forward
        self.window_len = 0  # tokens of the recorded forward

    def record(self) -> None:
        """Record the next forward's new tokens so that ``rewind`` can drop a suffix of them."""
        self.windows, self.window_len = [None] * len(self.conv), 0

    @classmethod
    def from_step_state(cls, state: "StepState", length: int) -> "InferenceCache":
        """A cache continuing a decode state of ``length`` tokens, sharing its tensors (the KV buffers
        take the forward's new keys in place where they have room)."""
        cache = cls(len(state.conv))
        cache.conv, cache.ssm = list(state.conv), list(state.ssm)
        for kv, k, v in zip(cache.kv, state.k, state.v):
            if k is not None:
                kv.k, kv.v, kv.length = k, v, length
        cache.seen = length
        cache.key_mask = None if state.key_valid is None else state.key_valid[:, :length]
        return cache

    def rewind(self, keep: int) -> None:
        """Keep the first ``keep`` tokens of the recorded forward and drop the rest: attention's KV
        cache is truncated; each Mamba layer's conv state is the K-1 inputs before the cut and its SSM
        state is recomputed from the window's inputs (ssd.ssd_prefix_state), no second forward."""
        if self.windows is None:
            raise ValueError("rewind needs a forward recorded after cache.record()")
        drop = self.window_len - keep
        if not 0 <= drop <= self.window_len:
            raise ValueError(f"cannot keep {keep} of {self.window_len} recorded tokens")
        for i, w in enumerate(self.windows):
            if w is None or drop == 0:
                continue
            K1 = w.x_seq.shape[1] - self.window_len  # K-1
            tail = torch.cat([w.x_seq[:, keep:keep + K1].flatten(2), w.bc_seq[:, keep:keep + K1]], dim=-1)
            self.conv[i] = tail.transpose(1, 2).contiguous()  # [b, C, K-1]
            self.ssm[i] = w.ssm0.clone() if keep == 0 and w.ssm0 is not None else \
                ssd_prefix_state(w.x[:, :keep], w.dt[:, :keep], w.A, w.B[:, :keep], w.ssm0, w.head_order)
        for kv in self.kv:
            if kv.k is not None:
                kv.length -= drop
        self.seen -= drop
        if self.key_mask is not None:
            self.key_mask = self.key_mask[:, :self.seen]
        self.windows, self.window_len = None, 0

    def advance(self, l: int) -> None:
        """After a forward of ``l`` new tokens: they are seen (and, when recording, the window's length)."""
        self.seen += l
        if self.windows is not None:
            self.window_len = l

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


class StepState:
    """Per layer index (None elsewhere): conv [b, C, K-1], ssm [b, h, p, n] float32, k, v [b, nkv, cap, hd].
    ``pos`` ([1] long tensor, so a compiled or captured step reads it): the position of the next token.
    ``key_valid`` [b, cap] bool: False on prompt padding; None when nothing is padded."""

    def __init__(self, conv: list, ssm: list, k: list, v: list, pos: int, key_valid: torch.Tensor | None,
                 device=None):
        self.conv, self.ssm, self.k, self.v = conv, ssm, k, v
        self.pos = torch.tensor([pos], dtype=torch.long, device=device)
        self.key_valid = key_valid

    @classmethod
    def from_cache(cls, cache: InferenceCache, device=None) -> "StepState":
        """The states of a prefill, without copying (KV buffers keep their spare capacity)."""
        key_valid = None
        cap = max((kv.k.shape[2] for kv in cache.kv if kv.k is not None), default=cache.seen)
        if cache.key_mask is not None:
            key_valid = cache.key_mask.new_ones(cache.key_mask.shape[0], cap)
            key_valid[:, :cache.seen] = cache.key_mask
        return cls(list(cache.conv), [None if t is None else t.contiguous() for t in cache.ssm],
                   [kv.k for kv in cache.kv], [kv.v for kv in cache.kv], cache.seen, key_valid, device)

    @classmethod
    def zeros(cls, model, subnet, batch: int, capacity: int) -> "StepState":
        """Zero states of ``batch`` sequences of up to ``capacity`` tokens for a budget (static decode)."""
        _, views = model.layer_views(subnet)
        n, dt, dev = model.config.num_hidden_layers, model.dtype, model.device
        conv, ssm, k, v = [None] * n, [None] * n, [None] * n, [None] * n
        for i, (blk, w) in enumerate(zip(model.backbone.layers, views)):
            if w is None:
                continue
            if blk.block_type == "linear_attention":
                h, p = w.Wz.shape[0], w.Wz.shape[1]
                conv[i] = torch.zeros(batch, h * p + 2 * w.WB.shape[0], model.config.conv_kernel - 1, dtype=dt,
                                      device=dev)
                ssm[i] = torch.zeros(batch, h, p, model.config.ssm_state_size, dtype=torch.float32, device=dev)
            elif blk.block_type == "full_attention":
                a = blk.mixer
                k[i] = torch.zeros(batch, a.num_kv_heads, capacity, a.head_dim, dtype=dt, device=dev)
                v[i] = torch.zeros_like(k[i])
        return cls(conv, ssm, k, v, 0, torch.ones(batch, capacity, dtype=torch.bool, device=dev), dev)

    def load(self, cache: InferenceCache) -> None:
        """Copy a prefill's states into these buffers (in place: their addresses stay)."""
        l = cache.seen
        for i, t in enumerate(cache.conv):
            if t is not None:
                self.conv[i].copy_(t)
                self.ssm[i].copy_(cache.ssm[i])
        for i, kv in enumerate(cache.kv):
            if kv.k is not None:
                self.k[i][:, :, :l].copy_(kv.k[:, :, :l])
                self.v[i][:, :, :l].copy_(kv.v[:, :, :l])
        self.key_valid.fill_(True)
        if cache.key_mask is not None:
            self.key_valid[:, :l].copy_(cache.key_mask)
        self.pos.fill_(l)

    def reserve(self, n: int) -> None:
        """Room for ``n`` tokens in the KV cache (and key_valid): grow by doubling (dynamic decode)."""
        for i, k in enumerate(self.k):
            if k is not None and n > k.shape[2]:
                for kv in (self.k, self.v):
                    old = kv[i]
                    kv[i] = old.new_empty(old.shape[0], old.shape[1], max(n, 2 * old.shape[2]), old.shape[3])
                    kv[i][:, :, :old.shape[2]] = old
        if self.key_valid is not None and n > self.key_valid.shape[1]:
            old = self.key_valid
            self.key_valid = old.new_ones(old.shape[0], max(n, 2 * old.shape[1]))
            self.key_valid[:, :old.shape[1]] = old
