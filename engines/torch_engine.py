"""Torch engine: every budget of a nested model from its one weight copy, instant budget switch.

Prefill is the elastic forward (model.py). Decode is a lean single-token step over the same weight
views (elastic.*_views, cached per budget by the model): states preallocated and updated in place,
B and C broadcast over the heads of their group instead of repeated, no padding logic unless the
prompt was padded. Its numerics are checked against the elastic forward (tests/test_engines.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from elastic_export.elastic import Subnet, validate_subnet
from elastic_export.errors import BudgetError
from elastic_export.model import _linear3, _out3
from elastic_export.ssd import group_heads, ungroup_heads

from .generation import generate


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


class TorchEngine:
    """``budgets``: name -> Subnet, largest first. Tensors in and out are torch (logits float32)."""

    def __init__(self, model, budgets: dict[str, Subnet], threads: int | None = None):
        if not budgets:
            raise BudgetError("no budgets to serve", field="budgets")
        for name, s in budgets.items():
            validate_subnet(model.config, s, where=f"budget {name}")
        if model.dtype != torch.float32:
            raise BudgetError("the torch engine runs float32 weights", field="dtype", fix="load the model as fp32")
        self.model = model.eval()
        self.cfg = model.config
        self._subnets = dict(budgets)
        self.threads = threads
        self.set_budget(next(iter(budgets)))

    @property
    def budgets(self) -> list[str]:
        return list(self._subnets)

    def set_budget(self, name: str) -> None:
        if name not in self._subnets:
            raise BudgetError(f"unknown budget {name!r}", field="budget", fix=f"use one of {self.budgets}")
        self.budget, self.subnet = name, self._subnets[name]
        with torch.no_grad():
            self.views = self.model.layer_views(self.subnet)[1]  # views of the one weight copy (cached)
        m, d = self.model, self.subnet.hidden
        self.emb = m.backbone.embeddings.weight[:, :d]
        self.head = m.lm_head_weight[:, :d]
        self.norms = [blk.norm.weight[:d] for blk in m.backbone.layers]
        self.norm_f = m.backbone.norm_f.weight[:d]
        with torch.no_grad():
            self._plans = {i: self._mamba_plan(blk.mixer, v) for i, (blk, v) in enumerate(zip(m.backbone.layers,
                                                                                                self.views))
                           if v is not None and blk.block_type == "linear_attention"}
        self.cache = None

    def _threads(self):
        if self.threads is not None and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    # ---- prefill ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Run the prompt [b, l]; keep its states for decode. Returns logits [b, l, V] (or [b, V])."""
        self._threads()
        input_ids = torch.as_tensor(input_ids)
        self.cache = self.model.new_cache()
        logits = self.model(input_ids, subnet=self.subnet, cache=self.cache, attention_mask=attention_mask,
                            last_only=last_only)
        c = self.cache
        self.pos = c.seen
        b = input_ids.shape[0]
        self.key_mask = c.key_mask  # None unless the prompt was padded
        self.kv = {}
        for i, kv in enumerate(c.kv):
            if kv.k is not None:
                self.kv[i] = [kv.k, kv.v]  # [b, nkv, cap, hd]; grown by doubling
        self.b = b
        c.ssm = [None if t is None else t.contiguous() for t in c.ssm]  # updated in place by decode
        return logits[:, -1] if last_only else logits

    # ---- decode ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One new token per sequence ([b] or [b, 1]) -> logits [b, V] float32."""
        if self.cache is None:
            raise BudgetError("decode before prefill", field="decode", fix="call prefill(prompt) first")
        self._threads()
        tok = torch.as_tensor(tokens).reshape(-1)
        eps = self.cfg.layer_norm_epsilon
        if self.key_mask is not None:
            self.key_mask = torch.cat([self.key_mask, self.key_mask.new_ones(self.b, 1)], dim=1)
        h = F.embedding(tok, self.emb)  # [b, d]
        for i, (blk, v) in enumerate(zip(self.model.backbone.layers, self.views)):
            if v is None:
                continue
            x = _rms(h, self.norms[i], eps)
            t = blk.block_type
            if t == "linear_attention":
                x = self._mamba(i, blk.mixer, v, x)
            elif t == "full_attention":
                x = self._attention(i, blk.mixer, v, x)
            else:
                bu, bd = v.biases if v.biases is not None else (None, None)
                x = F.linear(torch.relu(F.linear(x, v.Wup, bu)).square(), v.Wdown, bd)
            h = h + x
        self.pos += 1
        self.cache.seen = self.pos
        return F.linear(_rms(h, self.norm_f, eps), self.head)

    def _mamba_plan(self, m, v):
        """Per-budget constants of one Mamba layer: weight views, plus the few tiny tensors a decode step
        would otherwise rebuild every call (the conv kernel of the kept channels, A = -exp(A_log))."""
        h, p = v.Wz.shape[0], v.Wz.shape[1]
        K = v.conv_bc.shape[-1]
        conv_w = torch.cat([v.conv_x.reshape(h * p, K), v.conv_bc])  # [C, K], ~0.1% of the layer's bytes
        conv_b = None if v.conv_bias_x is None else torch.cat([v.conv_bias_x.reshape(-1), v.conv_bias_bc])
        Wout = v.Wout.flatten(1, 2) if v.Wout.stride(1) == p * v.Wout.stride(2) else None
        return dict(h=h, p=p, GN=v.WB.shape[0], G=m.n_groups, rank_major=m.head_order == "rank_major",
                    conv_w=conv_w, conv_b=conv_b, A=-torch.exp(v.A_log.float()), D=v.D[:, None],
                    norm=v.norm.reshape(-1), Wout=Wout, eps=m.eps, dt_min=m.dt_min, dt_max=m.dt_max)

    def _mamba(self, i, m, v, x):
        c = self._plans[i]
        h, p, GN, G = c["h"], c["p"], c["GN"], c["G"]
        b, r, n = x.shape[0], h // G, GN // G
        if v.fused is not None:
            z, xs, B, C, dt = F.linear(x, v.fused, m.in_proj.bias).split([h * p, h * p, GN, GN, h], dim=-1)
        else:
            z, xs = _linear3(x, v.Wz).flatten(1), _linear3(x, v.Wx).flatten(1)
            B, C, dt = F.linear(x, v.WB), F.linear(x, v.WC), F.linear(x, v.Wdt)
            if v.bias is not None:
                bz, bx, bB, bC, bdt = v.bias
                z, xs, B, C, dt = z + bz.flatten(), xs + bx.flatten(), B + bB, C + bC, dt + bdt
        # depthwise causal conv over [state | new]; the state keeps the last K-1 inputs [b, C, K-1]
        seq = torch.cat([self.cache.conv[i], torch.cat([xs, B, C], dim=-1)[:, :, None]], dim=2)  # [b, C, K]
        self.cache.conv[i] = seq[:, :, 1:]
        xbc = (seq * c["conv_w"]).sum(-1)
        if c["conv_b"] is not None:
            xbc = xbc + c["conv_b"]
        xs, B, C = F.silu(xbc).split([h * p, GN, GN], dim=-1)
        # SSD step in place: S = exp(dt A) S + dt x B^T, y = S C, B and C broadcast over their group's heads
        dt = F.softplus(dt + v.dt_bias).clamp(c["dt_min"], c["dt_max"])  # [b, h]
        S = self.cache.ssm[i]  # [b, h, p, n]
        if c["rank_major"]:  # head j*G + g: heads as [r, G]
            hv, gv = (b, r, G), (b, 1, G)
        else:  # head g*r + j: heads as [G, r]
            hv, gv = (b, G, r), (b, G, 1)
        S.mul_(torch.exp(dt * c["A"])[:, :, None, None])
        xh = xs.view(b, h, p)
        S.view(*hv, p, n).add_((dt[:, :, None] * xh).view(*hv, p, 1) * B.view(*gv, 1, n))
        y = (S.view(*hv, p, n) @ C.view(*gv, n, 1)).view(b, h, p)
        y = (y + xh * c["D"]) * F.silu(z.view(b, h, p))
        yg = y.view(*hv, p)  # gated RMSNorm over each group's channels
        axes = (1, 3) if c["rank_major"] else (2, 3)
        y = (yg * torch.rsqrt(yg.pow(2).mean(dim=axes, keepdim=True) + c["eps"])).view(b, h * p) * c["norm"]
        out = F.linear(y, c["Wout"]) if c["Wout"] is not None else _out3(y.view(b, h, p), v.Wout)
        return out if v.bout is None else out + v.bout

    def _attention(self, i, a, v, x):
        nkv, hd = a.num_kv_heads, a.head_dim
        bq, bk, bv, bo = v.biases if v.biases is not None else (None,) * 4
        q = F.linear(x, v.Wq, bq).view(-1, 1, v.Wq.shape[0] // hd, hd)  # [b, 1, h, hd]
        k = F.linear(x, v.Wk, bk).view(-1, nkv, 1, hd)
        val = F.linear(x, v.Wv, bv).view(-1, nkv, 1, hd)
        kv = self.kv[i]
        T = self.pos + 1
        if T > kv[0].shape[2]:  # grow by doubling
            for j in range(2):
                old = kv[j]
                kv[j] = old.new_empty(old.shape[0], nkv, 2 * old.shape[2], hd)
                kv[j][:, :, :self.pos] = old[:, :, :self.pos]
        kv[0][:, :, self.pos:T] = k
        kv[1][:, :, self.pos:T] = val
        hq = q.shape[2]
        q = group_heads(q, nkv, a.head_order, 2).flatten(2, 3).transpose(1, 2)  # [b, h, 1, hd]
        mask = None if self.key_mask is None else self.key_mask[:, None, None, :T]
        o = F.scaled_dot_product_attention(q, kv[0][:, :, :T], kv[1][:, :, :T], attn_mask=mask,
                                           scale=hd ** -0.5, enable_gqa=nkv != hq)
        o = o.transpose(1, 2).unflatten(2, (nkv, hq // nkv))  # [b, 1, nkv, r, hd]
        o = ungroup_heads(o, "rank_major", 2) if a.head_order == "rank_major" else o.flatten(2, 3)
        return F.linear(o.flatten(1), v.Wo, bo)

    def generate(self, input_ids, max_new_tokens: int, **kwargs) -> torch.Tensor:
        return generate(self, input_ids, max_new_tokens, **kwargs)
