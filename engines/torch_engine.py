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
from elastic_export.model import _linear3, _out3, clamp_dt

from .generation import generate


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # model.rms_norm spells the same norm out in ops so that the model exports to ONNX (aten::rms_norm
    # does not); the engine only runs, so it takes the fused op.
    return F.rms_norm(x, w.shape, w, eps)  # one fused op: x * rsqrt(mean(x^2) + eps) * w


class TorchEngine:
    """``budgets``: name -> Subnet, largest first. Tensors in and out are torch (logits float32)."""

    def __init__(self, model, budgets: dict[str, Subnet], threads: int | None = None, static: bool = False,
                 max_len: int = 4096):
        """``static=True`` decodes on preallocated states of ``max_len`` tokens with a fixed-shape step:
        compiled by torch.compile on CPU, replayed as a CUDA graph on GPU (engines.cuda_graph_decode).
        The first decode of each budget and batch size pays the compilation (seconds)."""
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
        self.static, self.max_len = static, max_len
        self._static: dict[tuple[str, int], object] = {}  # (budget, batch) -> GraphDecoder
        self._dec = None
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
        self._dec = None

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
        if self.static:
            return self._static_prefill(input_ids, attention_mask, last_only)
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
        if self.cache is None and self._dec is None:
            raise BudgetError("decode before prefill", field="decode", fix="call prefill(prompt) first")
        self._threads()
        if self._dec is not None:
            return self._dec.step(torch.as_tensor(tokens))[:, -1]
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
                x = F.linear(blk.mixer.act(F.linear(x, v.Wup, bu)), v.Wdown, bd)  # act: mlp_hidden_act
            h = h + x
        self.pos += 1
        self.cache.seen = self.pos
        return F.linear(_rms(h, self.norm_f, eps), self.head)

    def _static_prefill(self, input_ids, attention_mask, last_only):
        from .cuda_graph_decode import GraphDecoder

        key = (self.budget, input_ids.shape[0])
        if key not in self._static:
            self._static[key] = GraphDecoder(self.model, self.subnet, batch=input_ids.shape[0], max_len=self.max_len,
                                             compile=self.model.device.type == "cpu")
        self._dec = self._static[key]
        logits = self._dec.prefill(input_ids, attention_mask, last_only=last_only)
        return logits[:, -1] if last_only else logits

    def _mamba_plan(self, m, v):
        """Per-budget constants of one Mamba layer: weight views, plus the few tiny tensors a decode step
        would otherwise rebuild every call (the conv kernel of the kept channels, A = -exp(A_log))."""
        h, p = v.Wz.shape[0], v.Wz.shape[1]
        K = v.conv_bc.shape[-1]
        conv_w = torch.cat([v.conv_x.reshape(h * p, K), v.conv_bc])  # [C, K], ~0.1% of the layer's bytes
        conv_b = None if v.conv_bias_x is None else torch.cat([v.conv_bias_x.reshape(-1), v.conv_bias_bc])
        Wout = v.Wout.flatten(1, 2) if v.Wout.stride(1) == p * v.Wout.stride(2) else None
        G = m.n_groups
        r = h // G
        rank_major = m.head_order == "rank_major"
        hv, gv = ((-1, r, G), (-1, 1, G)) if rank_major else ((-1, G, r), (-1, G, 1))  # heads as 2 axes
        return dict(h=h, p=p, GN=v.WB.shape[0], G=G, hv=hv, gv=gv, axes=(1, 3) if rank_major else (2, 3),
                    conv_w=conv_w, conv_b=conv_b, A=-torch.exp(v.A_log.float()).view(hv[1:] + (1, 1)),
                    D=v.D.view(hv[1:] + (1, 1)), norm=v.norm.reshape(-1), Wout=Wout, eps=m.eps)

    def _mamba(self, i, m, v, x):
        c = self._plans[i]
        h, p, GN, hv, gv = c["h"], c["p"], c["GN"], c["hv"], c["gv"]
        b, n = x.shape[0], GN // c["G"]
        if v.fused is not None:  # x | B | C are adjacent rows: the conv input needs no concatenation
            z, xBC, dt = F.linear(x, v.fused, m.in_proj.bias).split([h * p, h * p + 2 * GN, h], dim=-1)
        else:
            z, xs = _linear3(x, v.Wz).flatten(1), _linear3(x, v.Wx).flatten(1)
            B, C, dt = F.linear(x, v.WB), F.linear(x, v.WC), F.linear(x, v.Wdt)
            if v.bias is not None:
                bz, bx, bB, bC, bdt = v.bias
                z, xs, B, C, dt = z + bz.flatten(), xs + bx.flatten(), B + bB, C + bC, dt + bdt
            xBC = torch.cat([xs, B, C], dim=-1)
        # depthwise causal conv over [state | new]; the state keeps the last K-1 inputs [b, C, K-1]
        seq = torch.cat([self.cache.conv[i], xBC[:, :, None]], dim=2)  # [b, C, K]
        self.cache.conv[i] = seq[:, :, 1:]
        xbc = (seq * c["conv_w"]).sum(-1)
        if c["conv_b"] is not None:
            xbc = xbc + c["conv_b"]
        xs, B, C = m.act(xbc).split([h * p, GN, GN], dim=-1)  # mamba_hidden_act, as the model
        # SSD step in place on [b, r, G, p, n] (rank-major heads; [b, G, r, ...] otherwise): B and C
        # broadcast over their group's heads. S = exp(dt A) S + dt x B^T, y = S C.
        dt = clamp_dt(F.softplus(dt + v.dt_bias), m.dt_limit).view(*hv, 1, 1)  # the model's clamp
        x5 = xs.view(*hv, p, 1)
        S = self.cache.ssm[i].view(*hv, p, n)
        S.mul_(torch.exp(dt * c["A"])).addcmul_(x5 * dt, B.view(*gv, 1, n))
        y = torch.addcmul(S @ C.view(*gv, n, 1), x5, c["D"])  # [b, r, G, p, 1]
        y = y * F.silu(z.view(*hv, p, 1))
        y = y * torch.rsqrt(y.pow(2).mean(dim=c["axes"], keepdim=True) + c["eps"])  # gated RMSNorm per group
        y = y.view(b, h * p) * c["norm"]
        out = F.linear(y, c["Wout"]) if c["Wout"] is not None else _out3(y.view(b, h, p), v.Wout)
        return out if v.bout is None else out + v.bout

    def _attention(self, i, a, v, x):
        nkv, hd = a.num_kv_heads, a.head_dim
        rows = v.Wq.shape[0]
        r = rows // hd // nkv
        k = F.linear(x, v.Wk).view(-1, nkv, 1, hd)
        val = F.linear(x, v.Wv).view(-1, nkv, 1, hd)
        kv = self.kv[i]
        T = self.pos + 1
        if T > kv[0].shape[2]:  # grow by doubling
            for j in range(2):
                old = kv[j]
                kv[j] = old.new_empty(old.shape[0], nkv, 2 * old.shape[2], hd)
                kv[j][:, :, :self.pos] = old[:, :, :self.pos]
        kv[0][:, :, self.pos:T] = k
        kv[1][:, :, self.pos:T] = val
        rank_major = a.head_order == "rank_major"  # query head j*nkv + g (else g*r + j)
        q = F.linear(x, v.Wq)
        q = q.view(-1, r, nkv, hd).transpose(1, 2) if rank_major else q.view(-1, nkv, r, hd)  # [b, nkv, r, hd]
        scores = (q @ kv[0][:, :, :T].transpose(2, 3)) * hd ** -0.5  # [b, nkv, r, T]
        if self.key_mask is not None:
            scores = scores.masked_fill(~self.key_mask[:, None, None, :T], float("-inf"))
        o = scores.softmax(-1) @ kv[1][:, :, :T]  # [b, nkv, r, hd]
        o = o.transpose(1, 2) if rank_major else o
        return F.linear(o.reshape(-1, rows), v.Wo)

    def generate(self, input_ids, max_new_tokens: int, **kwargs) -> torch.Tensor:
        return generate(self, input_ids, max_new_tokens, **kwargs)
