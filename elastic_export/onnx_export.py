"""ONNX export of every budget of a nested model: a prefill and a decode graph per budget, all reading
one weight file.

Graph I/O (b batch, l new tokens, T all tokens so far; i a kept layer's index in the parent):
    prefill: input_ids [b, l] int64, attention_mask [b, l] int64
             -> logits [b, l, V] float32, present.{i}.* states
    decode:  input_ids [b, 1], attention_mask [b, T] (over all tokens), past.{i}.* states
             -> logits [b, 1, V], present.{i}.* states
    states:  Mamba   .conv [b, h*p + 2*G*N, K-1], .ssm [b, h, p, N] (float32)
             attention .key / .value [b, nkv, T, hd]
Left padding of the prompt is supported through attention_mask (as in the torch elastic forward); a
decode step takes its new token as real (its mask column is 1).

Weights are never sliced in a graph. The budget's widths come from the elastic rule
(elastic.mamba_views / attention_views / mlp_views); each large matrix it keeps is a row range of a
stored tensor in the family weight file (onnx_graph.WeightFile), referenced by (offset, length).
Prefixes on the other axis become activation ops: an embedding width d < D zero-pads the input of a
projection to D and slices its output to d; Mamba head channels p < P compute all P channels of the
kept heads and slice (or zero-pad) the activation. Small tensors (conv kernels, norms, per-head
vectors) are stored in the graph itself. The cost is measured in benchmarks/onnx_sharing_bench.py.
MoE layers (stateless, like the MLP) are emitted by onnx_moe; their routers stay float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto

from . import activations, elastic, onnx_moe, onnx_quant, onnx_ssm
from .elastic import Subnet, validate_subnet
from .errors import BudgetError, ConfigError
from .onnx_graph import ONNX_DTYPES, WEIGHTS_FILE, GraphBuilder, WeightFile

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
ELEM = {"float32": TensorProto.FLOAT, "bfloat16": TensorProto.BFLOAT16}


@dataclass(frozen=True)
class StateSpec:
    """One recurrent state of a budget's graphs: inputs ``past.{name}``, outputs ``present.{name}``."""
    name: str  # "{layer}.conv", "{layer}.ssm", "{layer}.key", "{layer}.value"
    layer: int
    kind: str  # conv | ssm | key | value
    shape: tuple  # with "batch" and, for key/value, "past" symbols
    dtype: str = "float32"  # the SSM state is always float32; conv and KV states follow the compute dtype


def check_opset(ssm_op: str, opset: int | None) -> int:
    if ssm_op not in onnx_ssm.SSM_OPS:
        raise ConfigError(f"unknown SSM op {ssm_op!r}", field="ssm_op", fix=f"use one of {onnx_ssm.SSM_OPS}")
    lo = onnx_ssm.MIN_OPSET[ssm_op]
    if opset is None:
        return lo
    hi = onnx.defs.onnx_opset_version()
    if not lo <= opset <= hi:
        raise ConfigError(f"opset {opset} is not supported by --ssm-op {ssm_op}", field="opset",
                          fix=f"use an opset in {lo}..{hi}" + (" (LinearAttention and CausalConvWithState need 27)"
                                                              if ssm_op == "standard" else ""))
    return opset


COMPUTE_DTYPES = (torch.float32, torch.bfloat16)


def check_compute_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    if compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"unsupported compute dtype {compute_dtype}", field="compute_dtype",
                          fix="use torch.float32 or torch.bfloat16")
    return compute_dtype


def state_specs(cfg, subnet: Subnet, compute_dtype: torch.dtype = torch.float32) -> list[StateSpec]:
    G, N, K = cfg.n_groups, cfg.ssm_state_size, cfg.conv_kernel
    cd = str(compute_dtype).removeprefix("torch.")
    specs = []
    for i, (t, w) in enumerate(zip(cfg.layers_block_type, subnet.layers)):
        if not w.kept:
            continue
        if t == "linear_attention":
            h, p = w.mamba_heads, w.mamba_head_dim
            specs.append(StateSpec(f"{i}.conv", i, "conv", ("batch", h * p + 2 * G * N, K - 1), cd))
            specs.append(StateSpec(f"{i}.ssm", i, "ssm", ("batch", h, p, N)))
        elif t == "full_attention":
            for kind in ("key", "value"):
                specs.append(StateSpec(f"{i}.{kind}", i, kind, ("batch", cfg.num_key_value_heads, "past",
                                                                cfg.head_dim), cd))
    return specs


def _row_start(view: torch.Tensor, base: torch.Tensor) -> int:
    return (view.storage_offset() - base.storage_offset()) // base.stride(0)


def _col_start(view: torch.Tensor, base: torch.Tensor) -> int:
    return (view.storage_offset() - base.storage_offset()) % base.stride(0)


class Projections:
    """Matrix products of one graph at embedding width d of the parent's D, reading row ranges of the
    weight file (the per-layer emitters: _Budget's mixers and onnx_moe)."""

    def __init__(self, g: GraphBuilder, D: int, d: int):
        self.g, self.D, self.d = g, D, d
        self._wide: dict[str, str] = {}  # activation -> its zero-padded [M, D] (widen)

    def gemm_rows(self, x2: str, name: str, runs: list[tuple[int, int]]) -> list[str]:
        """x2 [M, d] times rows of a stored [R, D] weight; adjacent runs share one Gemm. A float weight
        is read at its full width D (x2 zero-padded: a column prefix of a row range is not contiguous);
        a quantized one at its first d columns (onnx_quant.matmul: whole blocks)."""
        g, merged = self.g, []
        for r0, r1 in runs:
            if merged and merged[-1][1] == r0:
                merged[-1][1] = r1
                merged[-1][2].append(r1 - r0)
            else:
                merged.append([r0, r1, [r1 - r0]])
        outs = []
        for r0, r1, sizes in merged:
            y = onnx_quant.matmul(g, x2, name, r0, r1, 0, self.d) if onnx_quant.quantized(g, name) else \
                g.op("Gemm", self.widen(x2), g.rows(name, r0, r1), transB=1)
            outs += [y] if len(sizes) == 1 else g.op("Split", y, g.const(sizes), axis=1, n_out=len(sizes))
        return outs

    def widen(self, x2: str) -> str:
        """[M, d] -> [M, D]: zero-pad the embedding axis so that full-width weight rows apply (one Pad
        per activation, however many weights read it)."""
        if self.d == self.D:
            return x2
        if x2 not in self._wide:
            self._wide[x2] = self.g.op("Pad", x2, self.g.const([0, 0, 0, self.D - self.d]))
        return self._wide[x2]

    def narrow(self, x2: str) -> str:
        """[M, D] -> [M, d]."""
        if self.d == self.D:
            return x2
        return self.g.op("Slice", x2, self.g.const([0]), self.g.const([self.d]), self.g.const([1]))

    def matmul_rows(self, y2: str, name: str, r0: int, r1: int) -> str:
        """y2 [M, r1-r0] times rows [r0, r1) of a stored [in, D] (transposed) weight -> [M, d]."""
        if onnx_quant.quantized(self.g, name):  # stored [D, in], not transposed
            return onnx_quant.matmul_in(self.g, y2, name, r0, r1, self.d)
        return self.narrow(self.g.op("MatMul", y2, self.g.rows(name, r0, r1)))

    def bias(self, y: str, b: torch.Tensor | None, hint: str) -> str:
        return y if b is None else self.g.op("Add", y, self.g.inline(b, hint, compute=True))

    def ffn(self, pre: str, mlp, v: elastic.MLPViews, x2: str, act: str) -> str:
        """down(act(up(x))) of an MLP (or MoE shared expert) whose weights are ``{pre}up_proj.weight``
        and ``{pre}down_proj.weight`` (stored transposed): x2 [M, d] -> [M, d]."""
        f = v.Wup.shape[0]
        bu, bd = v.biases if v.biases is not None else (None, None)
        u0 = _row_start(v.Wup, mlp.up_proj.weight)
        u = self.bias(self.gemm_rows(x2, pre + "up_proj.weight", [(u0, u0 + f)])[0], bu, "up_bias")
        u = activations.onnx(self.g, act, u)
        c0 = _col_start(v.Wdown, mlp.down_proj.weight)
        return self.bias(self.matmul_rows(u, pre + "down_proj.weight", c0, c0 + f), bd, "down_bias")


class _Budget(Projections):
    """Emits one graph (prefill or decode) of one budget."""

    def __init__(self, model, subnet: Subnet, wf: WeightFile, ssm_op: str, decode: bool,
                 compute_dtype: torch.dtype = torch.float32, moe_form: str = "auto"):
        super().__init__(GraphBuilder(wf, compute=compute_dtype), model.config.hidden_size, subnet.hidden)
        self.m, self.cfg, self.s, self.wf = model, model.config, subnet, wf
        self.mode, self.decode, self.moe_form = ssm_op, decode, moe_form
        self.compute_dtype = compute_dtype
        self.T = self.g.compute  # element type of activations (FLOAT, or BFLOAT16: see export_family)

    # ---- helpers ---------------------------------------------------------------------------------
    def clamp_dt(self, dt: str, limit: tuple[float, float]) -> str:
        """dt (float32, after Softplus) clamped to ``limit`` (model.dt_limit); no node where it cannot bind."""
        lo, hi = limit
        if lo <= 0.0 and not np.isfinite(hi):
            return dt
        hi = hi if np.isfinite(hi) else np.finfo(np.float32).max
        return self.g.op("Clip", dt, self.g.const(lo, np.float32), self.g.const(hi, np.float32))

    def rms_norm(self, x2: str, weight_name: str) -> str:
        """x / sqrt(mean(x^2) + eps) * w, written as the pattern ONNX Runtime fuses into one
        SimplifiedLayerNormalization kernel (Pow, ReduceMean, Add, Sqrt, Div, Mul)."""
        g, eps = self.g, self.cfg.layer_norm_epsilon
        x2 = g.to_f32(x2)  # statistics and the weight product in float32, as model.rms_norm
        ms = g.op("ReduceMean", g.op("Pow", x2, g.const(2.0, np.float32)), g.const([-1]), keepdims=1)
        xn = g.op("Div", x2, g.op("Sqrt", g.op("Add", ms, g.const(eps, np.float32))))
        return g.to_compute(g.op("Mul", xn, g.rows(weight_name, 0, self.d, dtype=FLOAT)))

    # ---- graph -----------------------------------------------------------------------------------
    def build(self) -> onnx.ModelProto:
        g, cfg = self.g, self.cfg
        V = cfg.vocab_size
        ids = g.input("input_ids", INT64, ["batch", 1 if self.decode else "seq"])
        mask = g.input("attention_mask", INT64, ["batch", "total" if self.decode else "seq"])
        self.pasts = {}
        if self.decode:
            for sp in state_specs(cfg, self.s, self.compute_dtype):
                self.pasts[sp.name] = g.input(f"past.{sp.name}", ELEM[sp.dtype], list(sp.shape))
        self.maskf = g.op("Cast", mask, to=FLOAT)  # [b, T]
        if self.decode:  # the new token is real (padding only ever precedes a prompt): no Mamba masking
            self.newmask2 = self.newmask3 = None
        else:
            shape = g.op("Shape", ids)
            self.b = g.op("Slice", shape, g.const([0]), g.const([1]))  # [1]
            self.l = g.op("Slice", shape, g.const([1]), g.const([2]))
            newmask = g.op("Slice", self.maskf, g.op("Neg", self.l), g.const([np.iinfo(np.int64).max]), g.const([1]))
            newmask = g.to_compute(newmask)  # multiplies activations
            self.newmask2 = g.op("Reshape", newmask, g.const([-1, 1]))  # [b*l, 1]
            self.newmask3 = g.op("Unsqueeze", newmask, g.const([2]))  # [b, l, 1]

        emb_name = "backbone.embeddings.weight"
        emb = onnx_quant.gather(g, emb_name, ids) if onnx_quant.quantized(g, emb_name) else \
            g.op("Gather", g.rows(emb_name, 0, V), ids, axis=0)  # [b, l, D]
        h = self.narrow(g.op("Reshape", emb, g.const([-1, self.D])))  # [b*l, d]
        self.presents: dict[str, str] = {}
        self.keymask = None
        views = self.m.layer_views(self.s)[1]
        for i, (blk, w, v) in enumerate(zip(self.m.backbone.layers, self.s.layers, views)):
            if v is None:
                continue
            x = self.rms_norm(h, f"backbone.layers.{i}.norm.weight")
            fn = {"linear_attention": self.mamba, "full_attention": self.attention, "mlp": self.mlp,
                  "moe": self.moe}[blk.block_type]
            h = g.op("Add", h, fn(i, blk.mixer, w, v, x))
        h = self.rms_norm(h, "backbone.norm_f.weight")
        head = "backbone.embeddings.weight" if self.m.lm_head is None else "lm_head.weight"  # as model.forward
        logits = self.gemm_rows(h, head, [(0, V)])[0]  # [b*l, V]
        logits = self.to3(g.to_f32(logits), V)  # float32 logits at every compute dtype
        g.output(logits, "logits", FLOAT, ["batch", 1 if self.decode else "seq", V])
        for sp in state_specs(cfg, self.s, self.compute_dtype):
            dims = [("total" if self.decode else "seq") if s == "past" else s for s in sp.shape]
            g.output(self.presents[sp.name], f"present.{sp.name}", ELEM[sp.dtype], dims)
        return g.model(f"budget_{'decode' if self.decode else 'prefill'}", self.opset)

    def to3(self, x2: str, *tail: int) -> str:
        """[b*l, ...] -> [b, l, *tail] (decode: l = 1, a constant shape)."""
        if self.decode:
            return self.g.op("Reshape", x2, self.g.const([-1, 1, *tail]))
        return self.g.op("Reshape", x2, self.g.op("Concat", self.b, self.g.const([-1, *tail]), axis=0))

    def mamba(self, i: int, m, w, v: elastic.MambaViews, x2: str) -> str:
        g, cfg = self.g, self.cfg
        G, N = cfg.n_groups, cfg.ssm_state_size
        W = m.in_proj.weight
        P = m.head_dim
        h, p = v.Wz.shape[0], v.Wz.shape[1]
        GN = G * N
        name = f"backbone.layers.{i}.mixer.in_proj.weight"
        if self.newmask2 is not None:
            x2 = g.op("Mul", x2, self.newmask2)  # padded positions contribute nothing
        # 1. in_proj rows [z | x | B | C | dt] of the kept heads (all P channels; sliced to p below)
        runs = [(_row_start(v.Wz, W), _row_start(v.Wz, W) + h * P), (_row_start(v.Wx, W), _row_start(v.Wx, W) + h * P),
                (_row_start(v.WB, W), _row_start(v.WB, W) + GN), (_row_start(v.WC, W), _row_start(v.WC, W) + GN),
                (_row_start(v.Wdt, W), _row_start(v.Wdt, W) + h)]
        z, xs, B, C, dt = self.gemm_rows(x2, name, runs)
        if p < P:  # keep p of the P channels computed per head: [b*l, h*P] -> [b*l, h*p]
            z, xs = (g.op("Reshape", g.op("Slice", g.op("Reshape", t, g.const([-1, h, P])), g.const([0]), g.const([p]),
                                          g.const([2])), g.const([-1, h * p])) for t in (z, xs))
        if v.bias is not None:
            z, xs, B, C, dt = (self.bias(t, bb.reshape(-1), "in_bias") for t, bb in zip((z, xs, B, C, dt), v.bias))
        if self.decode and self.mode == "decomposed":
            y = self._mamba_step(i, m, v, z, xs, B, C, dt, h, p)
        else:
            y = self._mamba_seq(i, m, v, z, xs, B, C, dt, h, p)
        if p < P:  # zero channels for the rows of out_proj this budget lacks
            y = g.op("Pad", g.op("Reshape", y, g.const([-1, h, p])), g.const([0, 0, 0, 0, 0, P - p]))
        y = g.op("Reshape", y, g.const([-1, h * P]))
        c0 = _col_start(v.Wout, m.out_proj.weight)
        return self.bias(self.matmul_rows(y, f"backbone.layers.{i}.mixer.out_proj.weight", c0, c0 + h * P),
                         v.bout, "out_bias")

    def _mamba_seq(self, i, m, v, z, xs, B, C, dt, h, p) -> str:
        """Conv, scan, D skip, gate and gated norm over [b, l] tokens -> y [b, l, h, p]."""
        g, cfg = self.g, self.cfg
        G, N, K = cfg.n_groups, cfg.ssm_state_size, cfg.conv_kernel
        GN = G * N
        # 2. depthwise causal conv over xBC, then mamba_hidden_act (SiLU)
        xbc = g.op("Transpose", self.to3(g.op("Concat", xs, B, C, axis=1), h * p + 2 * GN), perm=[0, 2, 1])
        cw = g.inline(torch.cat([v.conv_x.reshape(h * p, K), v.conv_bc]).unsqueeze(1), "conv_w")  # [C, 1, K]
        cb = None if v.conv_bias_x is None else g.inline(torch.cat([v.conv_bias_x.reshape(-1), v.conv_bias_bc]),
                                                         "conv_b")
        out, self.presents[f"{i}.conv"] = onnx_ssm.conv(g, self.mode, xbc, cw, cb, self.pasts.get(f"{i}.conv"), K,
                                                        cfg.mamba_hidden_act)
        # (the conv runs in float32, its state and output at the compute dtype: onnx_ssm.conv)
        out = g.op("Transpose", out, perm=[0, 2, 1])  # [b, l, C]
        if self.newmask3 is not None:
            out = g.op("Mul", out, self.newmask3)
        xs, B, C = g.op("Split", out, g.const([h * p, GN, GN]), axis=2, n_out=3)
        xs = g.op("Reshape", xs, g.const([0, 0, h, p]))
        B, C = (g.op("Reshape", t, g.const([0, 0, G, N])) for t in (B, C))
        # 3. SSD scan, D skip
        dt = g.op("Add", g.to_f32(self.to3(dt, h)), g.inline(v.dt_bias, "dt_bias"))
        dt = self.clamp_dt(g.op("Softplus", dt), m.dt_limit)
        A = g.inline(-torch.exp(v.A_log.float()), "A")
        # the scan runs in float32 (state and accumulation); the plugin takes x, B, C at the compute dtype
        sx, sB, sC = (xs, B, C) if self.mode == "plugin" else (g.to_f32(t) for t in (xs, B, C))
        y, self.presents[f"{i}.ssm"] = onnx_ssm.scan(g, self.mode, sx, dt, A, sB, sC,
                                                     self.pasts.get(f"{i}.ssm"), h, p, G, N, m.chunk_size,
                                                     m.head_order)
        y = g.op("Add", y, g.op("Mul", g.to_f32(xs), g.inline(v.D.float()[:, None], "D")))  # [b, l, h, p]
        # 4. gated RMSNorm over each group's channels (float32), out_proj
        z = g.to_f32(self.to3(z, h, p))
        y = g.op("Mul", y, g.op("Mul", z, g.op("Sigmoid", z)))
        r = h // G
        grouped, axes = ([0, 0, r, G, p], [2, 4]) if m.head_order == "rank_major" else ([0, 0, G, r, p], [3, 4])
        yg = g.op("Reshape", y, g.const(grouped))
        ms = g.op("ReduceMean", g.op("Mul", yg, yg), g.const(axes), keepdims=1)
        yg = g.op("Mul", yg, g.op("Reciprocal", g.op("Sqrt", g.op("Add", ms, g.const(m.eps, np.float32)))))
        return g.to_compute(g.op("Mul", g.op("Reshape", yg, g.const([0, 0, h, p])), g.inline(v.norm, "gnorm")))

    def _mamba_step(self, i, m, v, z, xs, B, C, dt, h, p) -> str:
        """One token in plain ops, on [b, ...] tensors (no sequence axis) -> y [b, h, p]. Heads are
        viewed as [r, G] (rank-major) or [G, r] so B and C broadcast over their group's heads."""
        g, cfg = self.g, self.cfg
        G, N, K = cfg.n_groups, cfg.ssm_state_size, cfg.conv_kernel
        GN, r = G * N, h // G
        new = g.op("Unsqueeze", g.op("Concat", xs, B, C, axis=1), g.const([2]))  # [b, C, 1]
        seq = g.op("Concat", self.pasts[f"{i}.conv"], new, axis=2)  # [b, C, K]
        self.presents[f"{i}.conv"] = g.op("Slice", seq, g.const([1]), g.const([K]), g.const([2]))
        cw = g.inline(torch.cat([v.conv_x.reshape(h * p, K), v.conv_bc]), "conv_w")  # [C, K]
        out = g.op("ReduceSum", g.op("Mul", g.to_f32(seq), cw), g.const([2]), keepdims=0)  # [b, C], float32
        if v.conv_bias_x is not None:
            out = g.op("Add", out, g.inline(torch.cat([v.conv_bias_x.reshape(-1), v.conv_bias_bc]), "conv_b"))
        out = g.to_compute(activations.onnx(g, cfg.mamba_hidden_act, out, f32=True))  # rounded as the sequence path's
        xs, B, C = (g.to_f32(t) for t in g.op("Split", out, g.const([h * p, GN, GN]), axis=1, n_out=3))
        dt = g.op("Softplus", g.op("Add", g.to_f32(dt), g.inline(v.dt_bias, "dt_bias")))
        dt = self.clamp_dt(dt, m.dt_limit)  # [b, h]
        rank_major = m.head_order == "rank_major"
        hv, gv = ([-1, r, G], [-1, 1, G]) if rank_major else ([-1, G, r], [-1, G, 1])  # heads as 2 axes

        def per_head(t: torch.Tensor) -> str:  # [h] -> [r, G, 1, 1] (or [G, r, 1, 1]), stored in the graph
            return g.inline(t.float().reshape(*hv[1:], 1, 1), "per_head")

        # everything below is [b, r, G, p, n]-shaped (rank-major); B and C broadcast over r
        dt5 = g.op("Reshape", dt, g.const(hv + [1, 1]))
        x5 = g.op("Reshape", xs, g.const(hv + [p, 1]))
        S = g.op("Reshape", self.pasts[f"{i}.ssm"], g.const(hv + [p, N]))
        dA = g.op("Exp", g.op("Mul", dt5, per_head(-torch.exp(v.A_log.float()))))
        S = g.op("Add", g.op("Mul", S, dA),
                 g.op("Mul", g.op("Mul", x5, dt5), g.op("Reshape", B, g.const(gv + [1, N]))))
        self.presents[f"{i}.ssm"] = g.op("Reshape", S, g.const([-1, h, p, N]))
        y = g.op("MatMul", S, g.op("Reshape", C, g.const(gv + [N, 1])))  # [b, r, G, p, 1]
        y = g.op("Add", y, g.op("Mul", x5, per_head(v.D)))
        z5 = g.op("Reshape", g.to_f32(z), g.const(hv + [p, 1]))
        y = g.op("Mul", y, g.op("Mul", z5, g.op("Sigmoid", z5)))
        ms = g.op("ReduceMean", g.op("Pow", y, g.const(2.0, np.float32)), g.const([1, 3] if rank_major else [2, 3]),
                  keepdims=1)
        y = g.op("Div", y, g.op("Sqrt", g.op("Add", ms, g.const(m.eps, np.float32))))
        return g.to_compute(g.op("Mul", g.op("Reshape", y, g.const([-1, h * p])), g.inline(v.norm.reshape(-1), "gnorm")))

    def attention(self, i: int, a, w, v: elastic.AttentionViews, x2: str) -> str:
        g, cfg = self.g, self.cfg
        nkv, hd = a.num_kv_heads, a.head_dim
        rows = v.Wq.shape[0]
        hq = rows // hd
        r = hq // nkv
        pre = f"backbone.layers.{i}.mixer."
        q0 = _row_start(v.Wq, a.q_proj.weight)  # (no biases: model.Attention)
        q = self.gemm_rows(x2, pre + "q_proj.weight", [(q0, q0 + rows)])[0]
        k = self.gemm_rows(x2, pre + "k_proj.weight", [(0, nkv * hd)])[0]
        val = self.gemm_rows(x2, pre + "v_proj.weight", [(0, nkv * hd)])[0]
        rank_major = cfg.head_order == "rank_major"
        if self.decode:
            o = self._attention_step(i, q, k, val, nkv, r, hd, rank_major)
        else:
            o = self._attention_seq(i, q, k, val, nkv, r, hd, rank_major)
        o = g.op("Reshape", o, g.const([-1, rows]))
        c0 = _col_start(v.Wo, a.o_proj.weight)
        return self.matmul_rows(o, pre + "o_proj.weight", c0, c0 + rows)

    def _attention_seq(self, i, q, k, val, nkv, r, hd, rank_major) -> str:
        """GQA over the prompt's queries, causal and padding-masked -> [b, l, heads..., hd], heads in stored order."""
        g = self.g
        k, val = (g.op("Transpose", self.to3(t, nkv, hd), perm=[0, 2, 1, 3]) for t in (k, val))  # [b,nkv,l,hd]
        self.presents[f"{i}.key"], self.presents[f"{i}.value"] = k, val  # [b, nkv, T, hd]
        # query heads: rank-major head j*nkv + g (or group-contiguous g*r + j) -> [b, nkv, r, l, hd]
        q5 = self.to3(q, r, nkv, hd) if rank_major else self.to3(q, nkv, r, hd)
        q5 = g.op("Transpose", q5, perm=[0, 3, 2, 1, 4] if rank_major else [0, 2, 3, 1, 4])
        kT = g.op("Unsqueeze", g.op("Transpose", k, perm=[0, 1, 3, 2]), g.const([2]))  # [b,nkv,1,hd,T]
        scores = g.op("Mul", g.to_f32(g.op("MatMul", q5, kT)), g.const(hd ** -0.5, np.float32))  # [b,nkv,r,l,T]
        # allowed: causal and not padding, or the query's own position
        T = g.op("Slice", g.op("Shape", k), g.const([2]), g.const([3]))
        kpos = g.op("Range", g.const(0), g.op("Squeeze", T, g.const([0])), g.const(1))  # [T]
        qpos = g.op("Add", g.op("Range", g.const(0), g.op("Squeeze", self.l, g.const([0])), g.const(1)),
                    g.op("Sub", T, self.l))  # [l]
        qpos = g.op("Unsqueeze", qpos, g.const([1]))
        causal = g.op("LessOrEqual", kpos, qpos)  # [l, T]
        keymask = g.op("Cast", g.op("Unsqueeze", self.maskf, g.const([1, 2, 3])), to=TensorProto.BOOL)
        allowed = g.op("Or", g.op("And", causal, keymask), g.op("Equal", kpos, qpos))  # [b,1,1,l,T]
        scores = g.op("Where", allowed, scores, g.const(-np.inf, np.float32))
        probs = g.to_compute(g.op("Softmax", scores, axis=-1))  # softmax in float32
        o = g.op("MatMul", probs, g.op("Unsqueeze", val, g.const([2])))  # [b,nkv,r,l,hd]
        return g.op("Transpose", o, perm=[0, 3, 2, 1, 4] if rank_major else [0, 3, 1, 2, 4])

    def _attention_step(self, i, q, k, val, nkv, r, hd, rank_major) -> str:
        """One query token per sequence: [b, nkv, r, hd] queries against the T cached keys."""
        g = self.g
        k, val = (g.op("Reshape", t, g.const([-1, nkv, 1, hd])) for t in (k, val))
        k = g.op("Concat", self.pasts[f"{i}.key"], k, axis=2)
        val = g.op("Concat", self.pasts[f"{i}.value"], val, axis=2)
        self.presents[f"{i}.key"], self.presents[f"{i}.value"] = k, val  # [b, nkv, T, hd]
        if rank_major:  # query head j*nkv + g
            q4 = g.op("Transpose", g.op("Reshape", q, g.const([-1, r, nkv, hd])), perm=[0, 2, 1, 3])
        else:
            q4 = g.op("Reshape", q, g.const([-1, nkv, r, hd]))
        scores = g.op("Mul", g.to_f32(g.op("MatMul", q4, g.op("Transpose", k, perm=[0, 1, 3, 2]))),
                      g.const(hd ** -0.5, np.float32))  # [b, nkv, r, T], float32
        if self.keymask is None:  # [b, 1, 1, T]; the new token's own column is 1
            self.keymask = g.op("Cast", g.op("Unsqueeze", self.maskf, g.const([1, 2])), to=TensorProto.BOOL)
        scores = g.op("Where", self.keymask, scores, g.const(-np.inf, np.float32))
        o = g.op("MatMul", g.to_compute(g.op("Softmax", scores, axis=-1)), val)  # [b, nkv, r, hd]
        return g.op("Transpose", o, perm=[0, 2, 1, 3]) if rank_major else o

    def mlp(self, i: int, mlp, w, v: elastic.MLPViews, x2: str) -> str:
        return self.ffn(f"backbone.layers.{i}.mixer.", mlp, v, x2, self.cfg.mlp_hidden_act)

    def moe(self, i: int, m, w, v: elastic.MoEViews, x2: str) -> str:
        """Stateless like the MLP (onnx_moe); ``auto``: dense experts in prefill, gathered in decode."""
        form = ("gather" if self.decode else "dense") if self.moe_form == "auto" else self.moe_form
        return onnx_moe.moe(self, f"backbone.layers.{i}.mixer.", m, v, x2, self.cfg.mlp_hidden_act, form)


def check_moe_form(model, budgets: dict[str, Subnet], moe_form: str, compute_dtype: torch.dtype) -> None:
    """Refuse a MoE form (``auto`` or one of onnx_moe.FORMS) that some MoE layer of some budget cannot use."""
    if moe_form not in ("auto", *onnx_moe.FORMS):
        raise ConfigError(f"unknown MoE form {moe_form!r}", field="moe_form",
                          fix=f"use one of {('auto', *onnx_moe.FORMS)}")
    if moe_form != "contrib":
        return
    cfg = model.config
    for name, s in budgets.items():
        for i, v in enumerate(model.layer_views(s)[1]):
            if v is None or cfg.layers_block_type[i] != "moe":
                continue
            why = onnx_moe.contrib_unfit(cfg.mlp_hidden_act, v, cfg.layer_dims(i)["moe_intermediate_size"],
                                         ONNX_DTYPES[compute_dtype])
            if why is not None:
                raise ConfigError(f"budget {name}, layer {i}: ONNX Runtime's contrib MoE operator does not fit: "
                                  f"{why}", field="moe_form", fix="use moe_form='dense' (standard ops)")


def budget_graph(model, subnet: Subnet, wf: WeightFile, kind: str, ssm_op: str = "standard",
                 opset: int | None = None, compute_dtype: torch.dtype = torch.float32,
                 moe_form: str = "auto") -> onnx.ModelProto:
    """The prefill or decode graph of one budget (initializers reference ``wf``'s file). ``moe_form``:
    how MoE layers compute their routed experts (onnx_moe.FORMS: ``dense`` or ``gather`` standard ops,
    or ``contrib``, ONNX Runtime's com.microsoft.MoE where it fits); ``auto``: dense in the prefill
    graph, gather in the decode graph (where it reads only the chosen experts' weights; measured in
    benchmarks/moe_onnx_bench.py)."""
    opset = check_opset(ssm_op, opset)
    validate_subnet(model.config, subnet)
    check_moe_form(model, {"": subnet}, moe_form, compute_dtype)
    b = _Budget(model, subnet, wf, ssm_op, decode=kind == "decode", compute_dtype=check_compute_dtype(compute_dtype),
                moe_form=moe_form)
    b.opset = opset
    with torch.no_grad():
        return b.build()


def export_family(model, budgets: dict[str, Subnet], out_dir: str | Path, ssm_op: str = "standard",
                  dtype: torch.dtype = torch.float32, opset: int | None = None,
                  compute_dtype: torch.dtype = torch.float32, moe_form: str = "auto", weights=None) -> dict:
    """Write ``weights.bin`` and ``{budget}.prefill.onnx`` / ``{budget}.decode.onnx`` for every budget
    into ``out_dir`` (which must exist). Returns the per-file part of the build manifest.

    ``dtype`` is the stored weights' dtype; ``compute_dtype`` the graphs' arithmetic. float32 compute
    (ONNX Runtime on CPU, which has no bf16 kernels) casts bf16 weights up. bfloat16 compute (the
    TensorRT target: a strongly typed network runs the graph's types as written) keeps matmuls, their
    biases, activations, the residual stream and the conv / KV states in bf16, and casts to float32
    where model.py computes in float32: RMSNorm statistics, softmax, dt, the SSD scan and its state,
    the D skip and the gated norm, the conv arithmetic, and the logits (output float32). MoE layers
    route in float32 at every compute dtype (their router is stored float32) and compute their experts
    in the form ``moe_form`` (see budget_graph). ``weights``: the weight file to write and read instead of
    the float one (onnx_quant.QuantWeightFile for a quantized build)."""
    out_dir = Path(out_dir)
    opset = check_opset(ssm_op, opset)
    check_compute_dtype(compute_dtype)
    if not budgets:
        raise BudgetError("no budget to build", field="budget", fix="give --budget all or a budget name")
    for name, s in budgets.items():
        validate_subnet(model.config, s, where=f"budget {name}")
    check_moe_form(model, budgets, moe_form, compute_dtype)
    if moe_form == "contrib" and getattr(weights, "lowering", None):
        raise ConfigError("ONNX Runtime's contrib MoE operator takes float experts, not quantized ones",
                          field="moe_form", fix="use moe_form='auto' (dense prefill, gathered decode) with --quant")
    model.eval()
    wf = weights if weights is not None else WeightFile(model, dtype)
    # a read-only loaded source (build) hands each tensor's pages back once written: one tensor resident
    after = getattr(model, "drop_source_pages", None) if weights is None else None
    sha = wf.write(out_dir / WEIGHTS_FILE) if after is None else wf.write(out_dir / WEIGHTS_FILE, after=after)
    files = {WEIGHTS_FILE: {"sha256": sha, "bytes": wf.nbytes}}
    graphs = {}
    for name, s in budgets.items():
        graphs[name] = {}
        for kind in ("prefill", "decode"):
            fname = f"{name}.{kind}.onnx"
            proto = budget_graph(model, s, wf, kind, ssm_op, opset, compute_dtype, moe_form)
            data = proto.SerializeToString()
            (out_dir / fname).write_bytes(data)
            files[fname] = {"sha256": _sha256(data), "bytes": len(data)}
            graphs[name][kind] = fname
    return {"files": files, "graphs": graphs, "opset": opset, "ssm_op": ssm_op,
            "compute_dtype": str(compute_dtype).removeprefix("torch."),
            "states": {name: [sp.__dict__ for sp in state_specs(model.config, s, compute_dtype)]
                       for name, s in budgets.items()}}


def _sha256(data: bytes) -> str:
    import hashlib
    return hashlib.sha256(data).hexdigest()
