"""ONNX nodes of one NemotronH MoE layer (layer type ``moe``), as transformers' ``NemotronHMoE`` and
:mod:`elastic_export.moe` compute it, for one budget.

    out = fc2(sum_k w_k * expert_{i_k}(fc1(x))) + shared(x)      expert(u) = down(act(up(u)))

Routing, in float32 and standard ops (opset >= 18): logits = x Wr^T (Gemm), scores = Sigmoid; the
choice is made on scores + e_score_correction_bias: with ``n_group`` groups and ``topk_group`` < n_group,
each group's score is the sum of its two best (TopK 2, ReduceSum), the chosen groups (TopK, then
ScatterElements into a [T, G] mask) keep their experts and the others become -inf (Where); then TopK k.
The weights are the plain scores at the chosen experts (GatherElements), divided by their sum + 1e-20
when ``norm_topk_prob``, times ``routed_scaling_factor``.

Three forms of the routed experts (``FORMS``):
- ``dense``: every kept expert runs on every token, weighted by a [T, e] routing matrix that is zero off
  the top-k (ScatterElements). Exact, standard ops only (ONNX Runtime and TensorRT alike); it costs all
  e experts per token instead of k, so it fits small expert counts (tiny models, tests).
      up:   [T, din] x rows [0, e*F) of experts.up_proj read flat [E*F, din]  -> [T, e*F]  (one Gemm)
      down: experts.down_proj rows [0, e) [e, din, F] x act^T [e, F, T]       -> [e, din, T] (batched MatMul)
      sum:  * routing^T [e, 1, T], ReduceSum over e in float32 (as transformers sums) -> [T, din]
- ``gather``: standard ops computing only the top-k experts per token: their weights are gathered per
  token (Gather on the stacked experts, [T, k, F, din]) and applied as a batched MatMul. It reads k
  experts' weights per token, the least a decode step can read, but copies them per token: for decode
  graphs (T = batch), not for long prefills.
- ``contrib``: ONNX Runtime's ``com.microsoft.MoE`` operator (CPU: float32, activations relu, silu,
  identity and tanh-gelu; ``relu2``, the activation of every NVIDIA checkpoint, is CUDA-only). It routes
  by softmax over its ``router_probs`` input, then top-k, then renormalizes; it has no sigmoid scores,
  no correction bias and no groups. We route ourselves (as above) and hand it log(w_k) at the chosen
  experts and -inf elsewhere, so that its softmax-top-k-renormalize gives w_k / sum(w); its output
  times sum(w) is the layer's. Its expert weights are the same row ranges as ``dense`` reads
  (transformers' stacked layout is the operator's). :func:`contrib_unfit` says where it does not fit.

Budget slicing (the elastic rule, elastic.moe_views): the first e experts (the router's rows and the
score bias with them), the first f neurons of each, the first s of the shared expert, top-k capped
(elastic.moe_top_k, carried by the views). With n_group > 1 the experts are stored rank-major (position
j*G + g holds the rank-j expert of group g), so "e/G per group" is the prefix e and a group is a
stride-G slice: the grouped routing views the e scores as [T, e/G, G]. Weights are never sliced in the
graph: an expert-width prefix f < F computes all F neurons of the kept experts and zeroes the rest
(their down-projection columns then add nothing), an embedding width d < D zero-pads the input
(onnx_export.Projections.widen) and slices the output, as the MLP does.

Quantized experts (``build --quant``, onnx_quant): the stacked tensors are stored flat, an expert being
R consecutive rows of codes. The dense form's up-projection is one MatMulNBits over the kept experts'
rows and the budget's d input columns; its down-projection one MatMulNBits per kept expert over the
budget's f neurons (whole blocks, no zeroed neurons) and its first d rows, weighted and summed in
float32. The gathered form dequantizes only the chosen experts as it gathers them
(GatherBlockQuantized), so a decode step reads k experts' codes. The router stays float32; the
contrib form takes float experts only.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from . import activations, elastic, onnx_quant

FLOAT = TensorProto.FLOAT
FORMS = ("dense", "gather", "contrib")
CONTRIB_DOMAIN = "com.microsoft"
# our activation name -> the contrib MoE operator's activation_type on ONNX Runtime's CPU provider
# (its gelu is the tanh approximation; relu2 exists on CUDA only)
CONTRIB_ACTIVATIONS = {"relu": "relu", "silu": "silu", "swish": "silu", "linear": "identity",
                       "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_python_tanh": "gelu",
                       "gelu_accurate": "gelu"}


def contrib_unfit(act: str, v: elastic.MoEViews, full_ffn: int, compute: int = FLOAT) -> str | None:
    """Why the contrib MoE operator cannot run this layer's budget (a sentence), or None when it can."""
    if act not in CONTRIB_ACTIVATIONS:
        return (f"activation {act!r} is not one ONNX Runtime's CPU MoE kernel has "
                f"({', '.join(sorted(set(CONTRIB_ACTIVATIONS.values())))}; relu2 is CUDA-only)")
    if compute != FLOAT:
        return "ONNX Runtime's CPU MoE kernel runs float32 only"
    if v.Wup.shape[1] != full_ffn:
        return (f"an expert width of {v.Wup.shape[1]} of {full_ffn} neurons is not a row range of the "
                "stacked expert weights the operator reads (it would copy them)")
    return None


def routing(g, pre: str, v: elastic.MoEViews, xw: str, router, n_group: int, topk_group: int,
            norm_topk_prob: bool, scale: float, head_order: str) -> tuple[str, str]:
    """xw [T, D] (the input zero-padded to the parent's width) -> (weights [T, k] float32, expert
    indices [T, k] int64), as NemotronHTopkRouter on the budget's e experts."""
    op, c = g.op, g.const
    e, k = v.Wr.shape[0], v.top_k
    r0 = _row0(v.Wr, router.weight)
    logits = op("Gemm", g.to_f32(xw), g.rows(pre + "gate.weight", r0, r0 + e, dtype=FLOAT),
                transB=1)  # [T, e] float32
    scores = op("Sigmoid", logits)
    choice = op("Add", scores, g.rows(pre + "gate.e_score_correction_bias", r0, r0 + e, dtype=FLOAT))
    if n_group > 1 and topk_group < n_group:  # else every group is chosen: no mask (as the model)
        r = e // n_group
        # experts as [T, r, G] (rank-major: group = position % G) or [T, G, r] (group-contiguous)
        rank_major = head_order == "rank_major"
        gaxis = 2 if rank_major else 1
        grouped = op("Reshape", choice, c([0, r, n_group] if rank_major else [0, n_group, r]))
        best2 = op("TopK", grouped, c([2]), axis=3 - gaxis, n_out=2)[0]  # two best of each group
        gscores = op("ReduceSum", best2, c([3 - gaxis]), keepdims=0)  # [T, G]
        chosen = op("TopK", gscores, c([topk_group]), axis=1, n_out=2)[1]  # [T, topk_group]
        zeros = op("ConstantOfShape", op("Shape", gscores), value=helper.make_tensor("v", FLOAT, [1], [0.0]))
        ones = op("ConstantOfShape", op("Shape", chosen), value=helper.make_tensor("v", FLOAT, [1], [1.0]))
        gmask = op("ScatterElements", zeros, chosen, ones, axis=1)  # [T, G], 1 on the chosen groups
        keep = op("Cast", op("Unsqueeze", gmask, c([3 - gaxis])), to=TensorProto.BOOL)  # [T, 1, G] / [T, G, 1]
        grouped = op("Where", keep, grouped, g.const(-np.inf, np.float32))
        choice = op("Reshape", grouped, c([0, e]))
    idx = op("TopK", choice, c([k]), axis=1, n_out=2)[1]  # [T, k]
    w = op("GatherElements", scores, idx, axis=1)  # the plain scores (the bias only steers the choice)
    if norm_topk_prob:
        w = op("Div", w, op("Add", op("ReduceSum", w, c([1]), keepdims=1), g.const(1e-20, np.float32)))
    if scale != 1.0:
        w = op("Mul", w, g.const(scale, np.float32))
    return w, idx


def routing_matrix(g, w: str, idx: str, e: int) -> str:
    """[T, e] float32: w[t, j] at column idx[t, j], zero elsewhere."""
    zeros = g.op("ConstantOfShape", g.op("Concat", g.op("Slice", g.op("Shape", idx), g.const([0]), g.const([1])),
                                          g.const([e]), axis=0),
                 value=helper.make_tensor("v", FLOAT, [1], [0.0]))
    return g.op("ScatterElements", zeros, idx, w, axis=1)


def moe(p, pre: str, m, v: elastic.MoEViews, x2: str, act: str, form: str = "dense") -> str:
    """The MoE layer of one budget: x2 [T, d] (compute dtype) -> [T, d]. ``p`` is the graph's
    onnx_export.Projections (its GraphBuilder and widths), ``pre`` the layer's weight-name prefix
    (``backbone.layers.{i}.mixer.``), ``m`` the mixer (elastic_export.moe.MoE, for its routing fields
    and full weights), ``v`` its views for the budget (elastic.moe_views)."""
    if form not in FORMS:
        raise ValueError(f"unknown MoE form {form!r}: use one of {FORMS}")
    g, op = p.g, p.g.op
    e, f = v.Wup.shape[0], v.Wup.shape[1]
    F = m.experts.up_proj.shape[1]
    e0 = _row0(v.Wup, m.experts.up_proj)
    quantized = onnx_quant.quantized(g, pre + "experts.up_proj")  # (contrib + quantized: refused by export_family)
    xw = p.widen(x2)  # [T, D]
    w, idx = routing(g, pre, v, xw, m.gate, m.n_group, m.topk_group, m.norm_topk_prob,
                     float(m.routed_scaling_factor), m.head_order)
    if v.latent is None:
        # [T, D]: the experts read all D columns of the zero-padded input (quantized and dense: its d)
        u, width = (x2, p.d) if quantized and form == "dense" else (xw, p.D)
    else:
        L = width = m.fc1_latent_proj.weight.shape[0]
        u = p.bias(p.gemm_rows(x2, pre + "fc1_latent_proj.weight", [(0, L)])[0], v.latent[1], "latent_bias")  # [T, L]
    if form == "dense" and quantized:
        y = _dense_quantized_experts(p, pre, u, width, w, idx, e0, e, f, F, act)
    elif form == "dense":
        y = _dense_experts(p, pre, u, w, idx, e0, e, f, F, act)
    elif form == "gather":
        y = _gathered_experts(p, pre, u, w, idx, e0, e, f, F, act)
    else:
        why = contrib_unfit(act, v, F, g.compute)
        if why is not None:
            raise ValueError(f"the contrib MoE form does not fit this layer: {why}; use form='dense'")
        y = _contrib_experts(g, pre, u, w, idx, e0, e, v.top_k, act)
    if v.latent is None:
        y = p.narrow(y) if width == p.D else y  # [T, D] -> [T, d]
    else:  # fc2 [D, L]: its first d rows, contiguous
        fc2 = pre + "fc2_latent_proj.weight"
        y = onnx_quant.matmul(g, y, fc2, 0, p.d) if onnx_quant.quantized(g, fc2) else \
            g.op("Gemm", y, g.rows(fc2, 0, v.latent[2].shape[0]), transB=1)
        y = p.bias(y, v.latent[3], "latent_bias")
    return op("Add", y, p.ffn(pre + "shared_experts.", m.shared_experts, v.shared, x2, act))


def _dense_experts(p, pre, u, w, idx, e0, e, f, F, act) -> str:
    """Every kept expert on every token, weighted by the routing matrix: u [T, din] -> [T, din]."""
    g, op, c = p.g, p.g.op, p.g.const
    h = op("Gemm", u, g.rows(pre + "experts.up_proj", e0 * F, (e0 + e) * F, flat=True), transB=1)  # [T, e*F]
    h = op("Reshape", activations.onnx(g, act, h), c([0, e, F]))  # [T, e, F]
    if f < F:  # the budget's f neurons per expert: the others zeroed (down then adds nothing for them)
        h = op("Mul", h, g.cconst(np.arange(F) < f))
    ys = op("MatMul", g.rows(pre + "experts.down_proj", e0, e0 + e), op("Transpose", h, perm=[1, 2, 0]))  # [e, din, T]
    rt = op("Unsqueeze", op("Transpose", routing_matrix(g, w, idx, e), perm=[1, 0]), c([1]))  # [e, 1, T]
    y = op("ReduceSum", op("Mul", g.to_f32(ys), rt), c([0]), keepdims=0)  # [din, T], float32
    return g.to_compute(op("Transpose", y, perm=[1, 0]))


def _dense_quantized_experts(p, pre, u, width, w, idx, e0, e, f, F, act) -> str:
    """The dense form over quantized experts (onnx_quant: stacked experts stored flat, an expert R
    consecutive rows): u [T, width] -> [T, width]. The up-projection of every kept expert is one
    MatMulNBits over their rows; the down-projection one per expert, over its first f columns (the
    budget's neurons) and first ``width`` rows; summed with the routing weights in float32."""
    g, op, c = p.g, p.g.op, p.g.const
    up, down = pre + "experts.up_proj", pre + "experts.down_proj"
    din = g.wf.stacked[down][1]  # rows of one expert's down-projection: the family's input width
    h = onnx_quant.matmul(g, u, up, e0 * F, (e0 + e) * F, 0, width)  # [T, e*F]
    h = op("Reshape", activations.onnx(g, act, h), c([0, e, F]))  # [T, e, F]
    ys = []
    for j in range(e):
        hj = op("Slice", h, c([j, 0]), c([j + 1, f]), c([1, 2]))  # [T, 1, f]
        r0 = (e0 + j) * din
        ys.append(onnx_quant.matmul(g, op("Reshape", hj, c([-1, f])), down, r0, r0 + width, 0, f))  # [T, width]
    y = op("Concat", *[op("Unsqueeze", t, c([1])) for t in ys], axis=1) if e > 1 else op("Unsqueeze", ys[0], c([1]))
    rt = op("Unsqueeze", routing_matrix(g, w, idx, e), c([2]))  # [T, e, 1]
    return g.to_compute(op("ReduceSum", op("Mul", g.to_f32(y), rt), c([1]), keepdims=0))  # [T, width]


def _gathered_experts(p, pre, u, w, idx, e0, e, f, F, act) -> str:
    """Only the chosen experts, their weights gathered per token: u [T, din] -> [T, din] (quantized
    experts: dequantized as they are gathered, onnx_quant.gather_experts)."""
    g, op, c = p.g, p.g.op, p.g.const

    def gathered(name):
        if onnx_quant.quantized(g, name):
            return onnx_quant.gather_experts(g, name, e0, e, idx)
        return op("Gather", g.rows(name, e0, e0 + e), idx, axis=0)

    up = gathered(pre + "experts.up_proj")  # [T, k, F, din]
    h = op("MatMul", up, op("Unsqueeze", u, c([1, 3])))  # [T, k, F, 1]
    h = activations.onnx(g, act, h)
    if f < F:
        h = op("Mul", h, g.cconst((np.arange(F) < f)[:, None]))
    down = gathered(pre + "experts.down_proj")  # [T, k, din, F]
    ys = op("MatMul", down, h)  # [T, k, din, 1]
    y = op("ReduceSum", op("Mul", g.to_f32(ys), op("Unsqueeze", w, c([2, 3]))), c([1, 3]), keepdims=0)  # [T, din]
    return g.to_compute(y)


def _contrib_experts(g, pre, u, w, idx, e0, e, k, act) -> str:
    """com.microsoft.MoE with our routing: u [T, din] float32 -> [T, din]."""
    op, c = g.op, g.const
    g.domains[CONTRIB_DOMAIN] = 1
    # router_probs: log(w) at the chosen experts, -inf elsewhere; the operator's softmax over them and
    # renormalization give w / sum(w)
    neg = g.op("ConstantOfShape", g.op("Concat", g.op("Slice", g.op("Shape", idx), c([0]), c([1])), c([e]), axis=0),
               value=helper.make_tensor("v", FLOAT, [1], [-np.inf]))
    logw = op("ScatterElements", neg, idx, op("Log", w), axis=1)  # [T, e]
    y = op("MoE", u, logw, g.rows(pre + "experts.up_proj", e0, e0 + e), "",
           g.rows(pre + "experts.down_proj", e0, e0 + e), domain=CONTRIB_DOMAIN, k=k,
           activation_type=CONTRIB_ACTIVATIONS[act], normalize_routing_weights=1)
    return op("Mul", y, op("ReduceSum", w, c([1]), keepdims=1))  # times sum(w): [T, din]


def _row0(view: torch.Tensor, base: torch.Tensor) -> int:
    return (view.storage_offset() - base.storage_offset()) // base.stride(0)


# ---- one layer as a model (tests, benchmarks) ---------------------------------------------------

def layer_model(m, v: elastic.MoEViews, act: str, d: int, form: str = "dense", opset: int = 18,
                dtype: torch.dtype = torch.float32, location: str = "weights.bin"):
    """A standalone ONNX model of one MoE mixer's budget: ``hidden`` [T, d] -> ``out`` [T, d], its
    weights in a WeightFile over ``m``'s own state dict (to be written to ``location`` beside the
    model). Returns (ModelProto, WeightFile)."""
    from .onnx_export import Projections
    from .onnx_graph import ONNX_DTYPES, GraphBuilder, WeightFile

    wf = WeightFile(m, dtype)
    g = GraphBuilder(wf, location, compute=dtype)
    p = Projections(g, m.gate.weight.shape[1], d)
    x = g.input("hidden", ONNX_DTYPES[dtype], ["tokens", d])
    with torch.no_grad():
        y = moe(p, "", m, v, x, act, form)
    g.output(y, "out", ONNX_DTYPES[dtype], ["tokens", d])
    return g.model(f"moe_{form}", opset), wf


def save_layer_model(proto: onnx.ModelProto, wf, path) -> None:
    """Write a layer_model's graph to ``path`` and its weight file beside it."""
    from pathlib import Path

    path = Path(path)
    wf.write(path.parent / _location(proto))
    path.write_bytes(proto.SerializeToString())


def _location(proto: onnx.ModelProto) -> str:
    for t in proto.graph.initializer:
        for kv in t.external_data:
            if kv.key == "location":
                return kv.value
    raise ValueError("the model reads no external weight")
