"""Greedy decode of the torch model as one CUDA graph per step.

A decode step of a small model is launch-bound: hundreds of tiny kernels, each costing more to
launch than to run. Capturing the whole step (embedding, every layer, lm_head, argmax) in a CUDA
graph makes it one launch. A graph replays fixed addresses and shapes, so the step runs on static
buffers: conv and SSM states updated in place, the KV cache preallocated to ``max_len`` with the
current position as a device tensor and attention masked to the positions written so far.

The Mamba and MLP layers are the model's own modules (the Mamba mixer sees a cache whose entries
copy into the static buffers when assigned); attention is re-stated here for a static KV cache.
On CPU (or with ``use_graph=False``) the same static step runs eagerly: the tests check it against
the model's own cached decode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from elastic_export import elastic
from elastic_export.model import rms_norm
from elastic_export.ssd import group_heads, ungroup_heads


class _InPlace(list):
    """A list of static buffers: item assignment copies into the buffer instead of rebinding it."""

    def __setitem__(self, i, value):
        super().__getitem__(i).copy_(value)


class _StaticCache:
    def __init__(self, conv, ssm):
        self.conv, self.ssm = _InPlace(conv), _InPlace(ssm)


class GraphDecoder:
    """``prefill(ids)`` with the model's own forward, then ``step()`` per greedy token.

    Batch rows must be unpadded (same length). ``max_len`` bounds prompt + generated tokens.
    """

    def __init__(self, model, subnet=None, batch: int = 1, max_len: int = 2048, use_graph: bool | None = None,
                 compile: bool = False):
        self.model = model
        self.subnet, self.views = model.layer_views(subnet)
        self.batch, self.max_len = batch, max_len
        dev = model.device
        self.use_graph = dev.type == "cuda" if use_graph is None else use_graph
        self.graph = None
        cfg = model.config
        self.conv, self.ssm, self.k, self.v = {}, {}, {}, {}
        for i, (blk, v) in enumerate(zip(model.backbone.layers, self.views)):
            if v is None:
                continue
            if blk.block_type == "linear_attention":
                h, p = v.Wz.shape[0], v.Wz.shape[1]
                C = h * p + 2 * v.WB.shape[0]
                self.conv[i] = torch.zeros(batch, C, cfg.conv_kernel - 1, dtype=model.dtype, device=dev)
                self.ssm[i] = torch.zeros(batch, h, p, cfg.ssm_state_size, dtype=torch.float32, device=dev)
            elif blk.block_type == "full_attention":
                nkv, hd = blk.mixer.num_kv_heads, blk.mixer.head_dim
                self.k[i] = torch.zeros(batch, nkv, max_len, hd, dtype=model.dtype, device=dev)
                self.v[i] = torch.zeros_like(self.k[i])
        n = cfg.num_hidden_layers
        self.cache = _StaticCache([self.conv.get(i) for i in range(n)], [self.ssm.get(i) for i in range(n)])
        self.pos = torch.zeros((), dtype=torch.long, device=dev)  # position of the next token
        self.length = 0
        self.token = torch.zeros(batch, dtype=torch.long, device=dev)  # next input token (in place)
        self.key_valid = torch.ones(batch, max_len, dtype=torch.bool, device=dev)  # False on prompt padding
        self.logits = None
        if compile and not self.use_graph:  # CPU: inductor fuses the step's many small ops; its C++
            # wrapper (instead of a Python one) saves ~10% of a small model's step
            self._step = torch.compile(self._step, dynamic=False, options={"cpp_wrapper": True})

    # ---- prefill: the model's forward, then states into the static buffers ------------------------
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                last_only: bool = True) -> torch.Tensor:
        b, l = input_ids.shape
        if b != self.batch or l >= self.max_len:
            raise ValueError(f"prefill of [{b}, {l}] does not fit batch={self.batch}, max_len={self.max_len}")
        cache = self.model.new_cache()
        logits = self.model(input_ids, subnet=self.subnet, cache=cache, attention_mask=attention_mask,
                            last_only=last_only)
        self.key_valid.fill_(True)
        if cache.key_mask is not None:
            self.key_valid[:, :l].copy_(cache.key_mask)
        for i in self.conv:
            self.conv[i].copy_(cache.conv[i])
            self.ssm[i].copy_(cache.ssm[i])
        for i in self.k:
            kv = cache.kv[i]
            self.k[i][:, :, :l].copy_(kv.k[:, :, :l])
            self.v[i][:, :, :l].copy_(kv.v[:, :, :l])
        self.pos.fill_(l)
        self.length = l
        self.token.copy_(logits[:, -1].argmax(-1))
        return logits

    # ---- one static step ----------------------------------------------------------------------
    def _attention(self, i, mixer, x, v):
        """Attention of one new token over the static KV cache [b, nkv, max_len, hd] up to pos."""
        hd, nkv = mixer.head_dim, mixer.num_kv_heads
        q = F.linear(x, v.Wq).unflatten(-1, (-1, hd))  # [b, 1, h, hd]
        k = F.linear(x, v.Wk).unflatten(-1, (nkv, hd)).transpose(1, 2)  # [b, nkv, 1, hd]
        val = F.linear(x, v.Wv).unflatten(-1, (nkv, hd)).transpose(1, 2)
        self.k[i].index_copy_(2, self.pos.view(1), k)
        self.v[i].index_copy_(2, self.pos.view(1), val)
        h = q.shape[2]
        q = group_heads(q, nkv, mixer.head_order, 2).flatten(2, 3).transpose(1, 2)  # [b, h, 1, hd]
        mask = ((torch.arange(self.max_len, device=x.device) <= self.pos) & self.key_valid)[:, None, None, :]
        o = F.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=mask, scale=hd ** -0.5,
                                           enable_gqa=nkv != h)
        o = o.transpose(1, 2).unflatten(2, (nkv, h // nkv))  # [b, 1, nkv, h/nkv, hd]
        o = ungroup_heads(o, mixer.head_order, 2)
        return F.linear(o.flatten(2), v.Wo)

    def _step(self):
        model, d = self.model, self.subnet.hidden
        eps = model.config.layer_norm_epsilon
        h = F.embedding(self.token[:, None], elastic.embedding_view(model.backbone.embeddings.weight, d))
        for i, (blk, v) in enumerate(zip(model.backbone.layers, self.views)):
            if v is None:
                continue
            x = rms_norm(h, elastic.norm_view(blk.norm, d), eps)
            if blk.block_type == "linear_attention":
                x = blk.mixer(x, v, self.cache, None)
            elif blk.block_type == "full_attention":
                x = self._attention(i, blk.mixer, x, v)
            else:
                x = blk.mixer(x, v)
            h = h + x
        h = rms_norm(h, elastic.norm_view(model.backbone.norm_f, d), eps)
        logits = F.linear(h, elastic.embedding_view(model.lm_head_weight, d)).float()  # [b, 1, V]
        self.pos.add_(1)
        self.token.copy_(logits[:, -1].argmax(-1))
        return logits

    def _capture(self):
        """Warm up (compiles the Triton kernels) on a snapshot of the state, restore it, capture."""
        buffers = [*self.conv.values(), *self.ssm.values(), *self.k.values(), *self.v.values(),
                   self.pos, self.token]
        saved = [t.clone() for t in buffers]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        for t, s in zip(buffers, saved):
            t.copy_(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ``tokens`` [b] (default ``self.token``, the greedy choice so far), return logits [b, 1, V];
        ``self.token`` becomes the next greedy token. No host synchronization."""
        if self.length + 1 > self.max_len:
            raise ValueError(f"max_len={self.max_len} reached")
        if tokens is not None:
            self.token.copy_(tokens.reshape(-1))
        self.length += 1
        if not self.use_graph:
            return self._step()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy: [b, l] -> [b, l + max_new_tokens]."""
        self.prefill(input_ids)
        out = [input_ids, self.token[:, None].clone()]
        for _ in range(max_new_tokens - 1):
            self.step()
            out.append(self.token[:, None].clone())
        return torch.cat(out, dim=1)
