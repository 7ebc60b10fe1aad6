"""The Mamba2 conv and SSD scan as ONNX nodes, in three modes (see onnx_export for the whole layer).

Shapes (b batch, l new tokens, h heads, p head dim, G groups, n state size, C conv channels):
    xbc [b, C, l]   conv state [b, C, K-1]   x [b, l, h, p]   dt [b, l, h]   B, C [b, l, G, n]
    SSM state [b, h, p, n] float32 (as cache.py; LinearAttention's own layout [b, h, n, p] stays inside)

- ``standard``: opset 27 ``CausalConvWithState`` (its fused silu, or none and the activation after it)
  and ``LinearAttention`` (update_rule gated,
  q = C, k = B, v = dt * x, decay = dt * A per head, scale 1.0).
- ``decomposed``: depthwise ``Conv`` over [past | new] and the chunked SSD of ssd.ssd_chunked in plain
  ops. Opset 18.
- ``plugin``: the conv as in ``decomposed``; the scan, prefill and decode alike, is the custom node
  of elastic_export.plugin_spec, which TensorRT's ONNX parser maps to our SSM-scan plugin.
The decode graph of ``decomposed`` does not come here: one token is a multiply-add conv and the
single-step update of ssd.ssd_step in plain ops (onnx_export._Budget._mamba_step).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from . import activations, plugin_spec
from .onnx_graph import GraphBuilder

SSM_OPS = ("standard", "decomposed", "plugin")
MIN_OPSET = {"standard": 27, "decomposed": 18, "plugin": 18}


# ---- depthwise causal conv -----------------------------------------------------------------------

def conv(g: GraphBuilder, mode: str, xbc: str, weight: str, bias: str | None, past: str | None,
         K: int, act: str) -> tuple[str, str]:
    """act(causal depthwise conv) over xbc [b, C, l] with state [b, C, K-1]. Returns (out, present).
    ``act``: the config's mamba_hidden_act (elastic_export.activations).

    xbc, the state and out are at the graph's compute dtype; weight, bias and the arithmetic are
    float32 (ONNX Conv has no bfloat16 before opset 22; the conv is a small part of the work)."""
    if mode == "standard":
        fused = act in ("silu", "swish")  # the op's own activation attribute
        out, present = g.op("CausalConvWithState", g.to_f32(xbc), weight, bias or "", g.to_f32(past) if past else "",
                            n_out=2, activation="silu" if fused else "none")
        if not fused:
            out = activations.onnx(g, act, out, f32=True)
        return g.to_compute(out), g.to_compute(present)
    if past is None:  # zero history: [b, C, K-1]
        zero = g.op("Mul", g.op("Slice", xbc, g.const([0]), g.const([1]), g.const([2])), g.cconst(0.0))
        past = g.op("Tile", zero, g.const([1, 1, K - 1]))
    seq = g.op("Concat", past, xbc, axis=2)  # [b, C, K-1+l]
    present = g.op("Slice", seq, g.const([-(K - 1)]), g.const([np.iinfo(np.int64).max]), g.const([2]))
    out = g.op("Conv", g.to_f32(seq), weight, *([bias] if bias else []), group=_channels(g, weight),
               kernel_shape=[K])
    return g.to_compute(activations.onnx(g, act, out, f32=True)), present


def _channels(g: GraphBuilder, weight: str) -> int:
    return int(g.inits[weight].dims[0])


# ---- SSD scan ------------------------------------------------------------------------------------

def expand_groups(g: GraphBuilder, t: str, h: int, G: int, head_order: str) -> str:
    """[b, l, G, n] -> [b, l, h, n]: head j*G + gi (rank-major) or gi*(h/G) + j uses group gi."""
    r = h // G
    if head_order == "rank_major":
        t = g.op("Expand", g.op("Unsqueeze", t, g.const([2])), g.const([1, 1, r, 1, 1]))  # [b, l, r, G, n]
    else:
        t = g.op("Expand", g.op("Unsqueeze", t, g.const([3])), g.const([1, 1, 1, r, 1]))  # [b, l, G, r, n]
    return g.op("Reshape", t, g.const([0, 0, h, -1]))


def scan(g: GraphBuilder, mode: str, x: str, dt: str, A: str, B: str, C: str, past: str | None,
         h: int, p: int, G: int, n: int, chunk_size: int, head_order: str) -> tuple[str, str]:
    """SSD scan. x [b,l,h,p], dt [b,l,h], A [h], B/C [b,l,G,n], past [b,h,p,n] or None -> (y, present)."""
    if mode == "standard":
        Bh, Ch = expand_groups(g, B, h, G, head_order), expand_groups(g, C, h, G, head_order)
        q = g.op("Reshape", Ch, g.const([0, 0, h * n]))
        k = g.op("Reshape", Bh, g.const([0, 0, h * n]))
        v = g.op("Reshape", g.op("Mul", x, g.op("Unsqueeze", dt, g.const([3]))), g.const([0, 0, h * p]))
        decay = g.op("Mul", dt, A)  # [b, l, h]
        st = g.op("Transpose", past, perm=[0, 1, 3, 2]) if past else ""  # [b, h, n, p]
        y, state = g.op("LinearAttention", q, k, v, st, decay, n_out=2, q_num_heads=h, kv_num_heads=h,
                        update_rule="gated", scale=1.0)
        return g.op("Reshape", y, g.const([0, 0, h, p])), g.op("Transpose", state, perm=[0, 1, 3, 2])
    if mode == "plugin":
        return plugin_node(g, x, dt, A, B, C, past, h, p, n, chunk_size, head_order)
    return _chunked(g, x, dt, A, B, C, past, h, p, G, n, chunk_size, head_order)


def plugin_node(g: GraphBuilder, x, dt, A, B, C, past, h, p, n, chunk_size, head_order) -> tuple[str, str]:
    """The SSM-scan plugin node of elastic_export.plugin_spec (the contract shared with the TensorRT
    plugin and its ONNX Runtime stand-in): inputs (x, dt, A, B, C, initial_state), outputs
    (y, final_state), float32; numerics those of ssd.ssd_chunked."""
    if past is None:
        shape = g.op("Concat", g.op("Slice", g.op("Shape", x), g.const([0]), g.const([1])), g.const([h, p, n]),
                     axis=0)
        past = g.op("ConstantOfShape", shape, value=_f32(0.0))
    g.domains[plugin_spec.ONNX_DOMAIN] = plugin_spec.ONNX_DOMAIN_VERSION
    outs = [g.fresh("ssd_y"), g.fresh("ssd_state")]
    g.nodes.append(plugin_spec.make_node([x, dt, A, B, C, past], outs, chunk_size, head_order))
    return outs[0], outs[1]


def _f32(v: float):
    from onnx import helper
    return helper.make_tensor("value", TensorProto.FLOAT, [1], [v])


def _segsum(g, a: str, T: str | int) -> str:
    """a [..., T] -> [..., T, T], out[i, j] = sum(a[j+1..i]) for j <= i, -inf above (ssd.segsum)."""
    if isinstance(T, int):
        strict = g.const(np.tril(np.ones((T, T), bool), -1), np.bool_)
        lower = g.const(np.tril(np.ones((T, T), bool), 0), np.bool_)
        cols = g.const([1, 1, 1, 1, T])
    else:  # dynamic T (a 1-element int64 tensor)
        ones = g.op("ConstantOfShape", g.op("Concat", T, T, axis=0), value=_f32(1.0))
        strict = g.op("Cast", g.op("Trilu", ones, g.const(-1), upper=0), to=TensorProto.BOOL)
        lower = g.op("Cast", g.op("Trilu", ones, g.const(0), upper=0), to=TensorProto.BOOL)
        cols = g.op("Concat", g.const([1, 1, 1]), T, axis=0)
    ae = g.op("Expand", g.op("Unsqueeze", a, g.const([-1])), cols)  # a[i] in every column j
    cum = g.op("CumSum", g.op("Where", strict, ae, g.const(0.0, np.float32)), g.const(-2))
    return g.op("Where", lower, cum, g.const(-np.inf, np.float32))


def _chunked(g, x, dt, A, B, C, past, h, p, G, n, cs, head_order) -> tuple[str, str]:
    """ssd.ssd_chunked in plain ops, heads expanded from groups (no Python branch on the length)."""
    l = g.op("Slice", g.op("Shape", x), g.const([1]), g.const([2]))
    pad = g.op("Mod", g.op("Sub", g.const([cs]), g.op("Mod", l, g.const([cs]))), g.const([cs]))

    def chunks(t: str, tail: list[int]) -> str:  # [b, l, h, *tail] -> [b, h, c, cs, *tail]
        zeros = g.const([0] * (2 + len(tail)))
        pads = g.op("Concat", g.const([0, 0]), zeros, pad, g.const([0] * (1 + len(tail))), axis=0)
        t = g.op("Reshape", g.op("Pad", t, pads), g.const([0, -1, cs, h, *tail]))
        return g.op("Transpose", t, perm=[0, 3, 1, 2, *range(4, 4 + len(tail))])

    X = chunks(g.op("Mul", x, g.op("Unsqueeze", dt, g.const([3]))), [p])  # [b,h,c,cs,p]
    Adt = chunks(g.op("Mul", dt, A), [])  # [b,h,c,cs]
    Bh = chunks(expand_groups(g, B, h, G, head_order), [n])  # [b,h,c,cs,n]
    Ch = chunks(expand_groups(g, C, h, G, head_order), [n])
    A_cum = g.op("CumSum", Adt, g.const(3))  # [b,h,c,cs]

    # 1. intra-chunk
    L = g.op("Exp", _segsum(g, Adt, cs))  # [b,h,c,cs,cs]
    CB = g.op("MatMul", Ch, g.op("Transpose", Bh, perm=[0, 1, 2, 4, 3]))
    Y_diag = g.op("MatMul", g.op("Mul", CB, L), X)  # [b,h,c,cs,p]
    # 2. chunk states
    A_last = g.op("Slice", A_cum, g.const([-1]), g.const([np.iinfo(np.int64).max]), g.const([3]))  # [b,h,c,1]
    decay = g.op("Exp", g.op("Sub", A_last, A_cum))
    Bd = g.op("Mul", Bh, g.op("Unsqueeze", decay, g.const([4])))
    states = g.op("MatMul", g.op("Transpose", Bd, perm=[0, 1, 2, 4, 3]), X)  # [b,h,c,n,p]
    # 3. inter-chunk recurrence
    if past is None:
        shape = g.op("Concat", g.op("Slice", g.op("Shape", x), g.const([0]), g.const([1])),
                     g.const([h, 1, n, p]), axis=0)
        init = g.op("ConstantOfShape", shape, value=_f32(0.0))
    else:
        init = g.op("Unsqueeze", g.op("Transpose", past, perm=[0, 1, 3, 2]), g.const([2]))  # [b,h,1,n,p]
    states = g.op("Concat", init, states, axis=2)  # [b,h,c+1,n,p]
    last = g.op("Pad", g.op("Squeeze", A_last, g.const([3])), g.const([0, 0, 1, 0, 0, 0]))  # [b,h,c+1]
    c1 = g.op("Slice", g.op("Shape", last), g.const([2]), g.const([3]))
    decay_chunk = g.op("Exp", _segsum(g, last, c1))  # [b,h,c+1,c+1]
    new = g.op("MatMul", decay_chunk, g.op("Reshape", states, g.const([0, 0, 0, n * p])))
    new = g.op("Reshape", new, g.const([0, 0, -1, n, p]))
    prev = g.op("Slice", new, g.const([0]), g.const([-1]), g.const([2]))
    final = g.op("Squeeze", g.op("Slice", new, g.const([-1]), g.const([np.iinfo(np.int64).max]), g.const([2])),
                 g.const([2]))  # [b,h,n,p]
    # 4. carried state -> outputs
    Y_off = g.op("Mul", g.op("MatMul", Ch, prev), g.op("Unsqueeze", g.op("Exp", A_cum), g.const([4])))
    y = g.op("Transpose", g.op("Add", Y_diag, Y_off), perm=[0, 2, 3, 1, 4])  # [b,c,cs,h,p]
    y = g.op("Slice", g.op("Reshape", y, g.const([0, -1, h, p])), g.const([0]), l, g.const([1]))
    return y, g.op("Transpose", final, perm=[0, 1, 3, 2])
