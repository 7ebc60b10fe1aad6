"""Quantized ONNX builds (``elastic-export build --quant int8|int4|fp8``): one quantized weight file that
every budget's graphs read, and the matmul / embedding nodes that read it.

The codes and scales are elastic_export.quant's (one block plan for the whole family, so a budget's
quantized weights are exactly rows and column prefixes of the family's). How each quantized tensor is
stored in ``weights.bin`` and computed in the graphs:

    int4 / int8, block >= 16   com.microsoft.MatMulNBits (ONNX Runtime's weight-only kernel)
                               B [N, K/b, b*bits/8] uint8: code + 8 (int4: two per byte, the even column
                               in the low nibble) or code + 128 (int8), zero point implicit;
                               scales [N, K/b] float32
    int4 / int8, block < 16    DequantizeLinear (opset 21 blocked, axis 1) of int8 codes [N, K] + Gemm
    fp8                        DequantizeLinear of float8e4m3fn codes [N, K] + Gemm (the Q/DQ form
                               TensorRT fuses; ONNX Runtime's CPU runs it unfused)
    embeddings                 com.microsoft.GatherBlockQuantized on the same uint8 layout (block >= 16),
                               else Gather of codes and scales and a Mul; fp8: DequantizeLinear + Gather
    MoE experts [E, R, K]      stored flat [E*R, K] (an expert is R consecutive rows): the dense form's
                               up-projection is one MatMulNBits over the kept experts' rows, its
                               down-projection one per kept expert; the gathered form (decode) reads the
                               chosen experts through GatherBlockQuantized, as the embedding

Every quantized tensor is stored row-major [out, in] (also out_proj / o_proj / down_proj, which the
float file stores transposed): a budget's output rows are a row range of B and of the scales, contiguous,
so every budget reads the one file, as in float builds. A budget narrower on the input axis (embedding
width, Mamba heads, FFN neurons) reads a column range of whole blocks: a ``Slice`` of B's block axis
(and of the scales') in front of MatMulNBits. Both inputs are initializers, so ONNX Runtime folds the
Slice at session creation and prepacks the folded, contiguous [N', K'/b, blob] for that session alone
(prepacking makes a private copy per session in any case); the budget's product then runs over its own
K' columns, not over zero-padded family columns. The DequantizeLinear lowering (blocks below 16, fp8)
shares its codes across sessions unfolded, so there a narrower input is zero-padded to the family's K.

ONNX Runtime runs MatMulNBits fast only on weights it has prepacked at session creation (measured:
without prepacking a 2048 x 2048 int4 product takes 10 ms against 0.6 ms for float32), and its Python API
keeps each session's prepacked copy private; engines/ort_engine.py keeps prepacking on for these builds.
``accuracy_level`` 4 lets MatMulNBits quantize its activations to int8 per block (the fast path: int8
dot products); 0 computes in float32 (exact to the dequantized weights; int8 weights are then slow).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto

from . import quant
from .errors import ConfigError
from .onnx_graph import ALIGN, ONNX_DTYPES, GraphBuilder, external_tensor, is_transposed

SCALES = ".scales"
MS = "com.microsoft"
ACCURACY_LEVELS = (0, 1, 4)  # MatMulNBits: unset (float32 compute), float32, int8 activations
NBITS_MIN_BLOCK = 16  # MatMulNBits and GatherBlockQuantized need a power of two >= 16


def lowering(fmt: str, block: int) -> str:
    """The node that computes a tensor quantized in ``fmt`` with column blocks of ``block``."""
    if fmt in ("int4", "int8") and block >= NBITS_MIN_BLOCK:
        return "MatMulNBits"
    return "DequantizeLinear"


def nbits_blob(q: torch.Tensor, fmt: str, block: int) -> torch.Tensor:
    """codes [N, K] (int8) -> MatMulNBits' B [N, K/b, b*bits/8] uint8, zero point 8 (int4) or 128 (int8)."""
    N, K = q.shape
    if fmt == "int4":
        u = quant.pack_int4(q)  # [N, K/2]
    else:
        u = (q.to(torch.int16) + 128).to(torch.uint8)
    return u.reshape(N, K // block, -1).contiguous()


def _raw(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn):
        t = t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.uint8)
    return t.numpy().tobytes()


def check_accuracy(level: int) -> int:
    if level not in ACCURACY_LEVELS:
        raise ConfigError(f"unknown MatMulNBits accuracy level {level}", field="quant_accuracy",
                          fix=f"use one of {ACCURACY_LEVELS} (4: int8 activations, fastest; 0: float32)")
    return level


class QuantWeightFile:
    """The weight file of a quantized build: the layout of onnx_graph.WeightFile (name -> (offset,
    stored shape), ``dtypes``, ``item``, ``row_range``) with the planned tensors stored as codes (under
    their own name) and float32 scales (under ``name + '.scales'``), the rest at float32 as in a float
    build. ``lowering`` names each quantized tensor's node (see :func:`lowering`)."""

    def __init__(self, model, qstate: dict, plan: dict[str, int], spec: quant.QuantSpec, accuracy_level: int = 4):
        check_accuracy(accuracy_level)
        self.dtype = torch.float32
        self.spec, self.plan, self.accuracy_level = spec, dict(plan), accuracy_level
        self.entries: dict[str, tuple[int, tuple[int, ...]]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.data: dict[str, torch.Tensor] = {}
        self.lowering: dict[str, str] = {}
        self.qshape: dict[str, tuple[int, int]] = {}  # logical [N, K] of each quantized tensor
        self.stacked: dict[str, tuple[int, int]] = {}  # MoE experts [E, R, K]: (E, R); stored flat [E*R, K]
        self._off = 0
        for name, p in model.state_dict().items():
            if name in plan:
                q, s = qstate[name]
                b = plan[name]
                if q.dim() == 3:
                    self.stacked[name] = tuple(q.shape[:2])
                    q, s = q.flatten(0, 1), s.flatten(0, 1)
                self.lowering[name] = lowering(spec.format, b)
                self.qshape[name] = tuple(q.shape)
                self._add(name, nbits_blob(q, spec.format, b) if self.lowering[name] == "MatMulNBits" else q)
                self._add(name + SCALES, s.float())
            else:
                t = p.detach().float()
                self._add(name, t.t() if is_transposed(name) else t)
        self.nbytes = self._off

    def _add(self, name: str, t: torch.Tensor) -> None:
        self._off = (self._off + ALIGN - 1) // ALIGN * ALIGN
        self.entries[name] = (self._off, tuple(t.shape))
        self.dtypes[name] = t.dtype
        self.data[name] = t
        self._off += t.numel() * t.element_size()

    def item(self, name: str) -> int:
        return torch.empty((), dtype=self.dtypes[name]).element_size()

    def row_range(self, name: str, r0: int, r1: int, flat: bool = False):
        off, shape = self.entries[name]
        if flat:
            shape = (int(np.prod(shape[:-1], dtype=np.int64)), shape[-1])
        row = int(np.prod(shape[1:], dtype=np.int64)) * self.item(name)
        return off + r0 * row, (r1 - r0, *shape[1:])

    def write(self, path: Path) -> str:
        sha = hashlib.sha256()
        with open(path, "wb") as f:
            pos = 0
            for name, (off, _) in self.entries.items():
                data = _raw(self.data[name])
                for chunk in (b"\0" * (off - pos), data):
                    f.write(chunk)
                    sha.update(chunk)
                pos = off + len(data)
        return sha.hexdigest()

    def record(self) -> dict:
        """What build.json keeps: the spec, the accuracy level and, per quantized tensor, its block and node."""
        return {**self.spec.to_dict(), "accuracy_level": self.accuracy_level,
                "tensors": {n: {"block": self.plan[n], "node": self.lowering[n]} for n in self.lowering}}


def quant_weights(model, budgets: dict, spec: quant.QuantSpec, accuracy_level: int = 4,
                  qstate: dict | None = None, plan: dict | None = None) -> QuantWeightFile:
    """The quantized weight file of ``model``'s family (``budgets``: every budget of the checkpoint, so
    that the plan is the family's). ``qstate`` / ``plan``: codes and plan read from a quantized nested
    checkpoint, used as they are; otherwise quantized here (quant.quantize_state)."""
    cfg = model.config
    sd = model.state_dict()
    if plan is None:
        plan = quant.quant_plan(cfg, budgets, {k: tuple(v.shape) for k, v in sd.items()}, spec)
    if qstate is None:
        qstate = quant.quantize_state({k: sd[k] for k in plan}, plan, spec)
    return QuantWeightFile(model, qstate, plan, spec, accuracy_level)


def source_quant(model) -> tuple[quant.QuantSpec, dict, dict] | None:
    """(spec, codes and scales, plan) of a model opened from a quantized nested checkpoint (``quantize``:
    ``qweights`` name -> (codes, int4 packed or not; scales; block), ``quantization`` its manifest entry),
    to build from as they are; None for a float model."""
    qw = getattr(model, "qweights", None)
    if not qw:
        return None
    entry = model.quantization
    spec = quant.QuantSpec(**{k: entry[k] for k in ("format", "block", "method", "embeddings", "lm_head",
                                                     "min_block") if k in entry})
    qstate = {n: (quant.unpack_int4(w.codes) if getattr(w, "packed", False) else w.codes, w.scales)
              for n, w in qw.items()}
    return spec, qstate, {n: w.block for n, w in qw.items()}


# ---- graph nodes -------------------------------------------------------------------------------

def quantized(g: GraphBuilder, name: str) -> bool:
    return name in getattr(g.wf, "lowering", ())


def _stored(g: GraphBuilder, name: str, r0: int, r1: int) -> str:
    """Rows [r0, r1) of a stored tensor at its stored type (no Cast)."""
    return g.rows(name, r0, r1, dtype=ONNX_DTYPES[g.wf.dtypes[name]])


def _external(g: GraphBuilder, name: str, dims: tuple[int, ...], r0: int = 0, r1: int | None = None) -> str:
    """Rows [r0, r1) (default: all) of the stored tensor ``name`` under the shape ``dims`` (same bytes),
    e.g. MatMulNBits' B [V, D/b, blob] read as GatherBlockQuantized's [V, D*bits/8]; the stored shape
    itself is the row range's own initializer (:func:`_stored`)."""
    r1 = g.wf.entries[name][1][0] if r1 is None else r1
    off, shape = g.wf.row_range(name, r0, r1)
    if tuple(dims) == tuple(shape):
        return _stored(g, name, r0, r1)
    key = f"{name}[{r0}:{r1}]{list(dims)}"
    if key not in g.inits:
        nbytes = int(np.prod(shape, dtype=np.int64)) * g.wf.item(name)
        assert int(np.prod(dims)) == int(np.prod(shape)), (name, dims, shape)
        g.inits[key] = external_tensor(key, ONNX_DTYPES[g.wf.dtypes[name]], dims, g.location, off, nbytes)
    return key


def matmul(g: GraphBuilder, x2: str, name: str, r0: int, r1: int, c0: int = 0, c1: int | None = None) -> str:
    """x2 [M, c1 - c0] (float32) times rows [r0, r1) and columns [c0, c1) of the quantized ``name``
    [N, K] (default: every column), transposed -> [M, r1 - r0]. The column bounds are whole blocks
    (quant.quant_plan aligns the blocks with every budget's widths)."""
    wf = g.wf
    b, K = wf.plan[name], wf.qshape[name][1]
    c1 = K if c1 is None else c1
    assert c0 % b == 0 and c1 % b == 0, (name, c0, c1, b)
    B, S = _stored(g, name, r0, r1), _stored(g, name + SCALES, r0, r1)
    if wf.lowering[name] == "MatMulNBits":
        if (c0, c1) != (0, K):  # whole blocks: a Slice of initializers, folded at session creation
            B, S = (g.op("Slice", t, g.const([c0 // b]), g.const([c1 // b]), g.const([1]), name="wcols")
                    for t in (B, S))
        g.domains[MS] = 1
        return g.op("MatMulNBits", x2, B, S, domain=MS, K=c1 - c0, N=r1 - r0,
                    bits=quant.FORMATS[wf.spec.format].bits, block_size=b, accuracy_level=wf.accuracy_level)
    if (c0, c1) != (0, K):  # codes shared unfolded across sessions: zero-pad the input to K instead
        x2 = g.op("Pad", x2, g.const([0, c0, 0, K - c1]))
    W = g.op("DequantizeLinear", B, S, axis=1, block_size=b)  # [N, K] float32
    return g.op("Gemm", x2, W, transB=1)


def matmul_in(g: GraphBuilder, y2: str, name: str, c0: int, c1: int, d: int) -> str:
    """y2 [M, c1 - c0] times columns [c0, c1) and rows [0, d) of the quantized ``name`` [D, K] -> [M, d]
    (out_proj, o_proj, down_proj: the float build's transposed tensors)."""
    return matmul(g, y2, name, 0, d, c0, c1)


def packed_initializers(proto: onnx.ModelProto) -> set[str]:
    """The initializers MatMulNBits prepacks: its B and scales, directly or through the column Slice."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    out = set()
    for n in proto.graph.node:
        if n.op_type != "MatMulNBits":
            continue
        for x in n.input[1:3]:
            src = producer.get(x)
            out.add(src.input[0] if src is not None and src.op_type == "Slice" else x)
    return out


def gather(g: GraphBuilder, name: str, ids: str) -> str:
    """Rows ``ids`` [b, l] of the quantized embedding table [V, D] -> [b, l, D] float32."""
    V = g.wf.qshape[name][0]
    return _gathered(g, name, ids, 0, V, (V,))


def gather_experts(g: GraphBuilder, name: str, e0: int, e: int, idx: str) -> str:
    """Experts ``idx`` [T, k] (positions among the kept e0..e0+e) of the stacked quantized ``name``
    [E, R, K] -> dequantized [T, k, R, K] float32, reading only the chosen experts' codes."""
    R = g.wf.stacked[name][1]
    return _gathered(g, name, idx, e0 * R, (e0 + e) * R, (e, R))


def _gathered(g: GraphBuilder, name: str, ids: str, r0: int, r1: int, lead: tuple[int, ...]) -> str:
    """Items ``ids`` [a, c] along the first axis of rows [r0, r1) of the quantized ``name`` [N, K] viewed
    as [*lead, K] -> [a, c, *lead[1:], K] float32, dequantizing only what is gathered (fp8: the view)."""
    wf = g.wf
    b, K = wf.plan[name], wf.qshape[name][1]
    S = _external(g, name + SCALES, (*lead, K // b), r0, r1)
    if wf.lowering[name] == "MatMulNBits":  # the same uint8 bytes, read as [*lead, K * bits / 8]
        bits = quant.FORMATS[wf.spec.format].bits
        g.domains[MS] = 1
        data = _external(g, name, (*lead, K * bits // 8), r0, r1)
        return g.op("GatherBlockQuantized", data, ids, S, domain=MS, bits=bits, block_size=b, gather_axis=0,
                    quantize_axis=len(lead))
    if wf.spec.format == "fp8":  # the Q/DQ form (ONNX Runtime's CPU Gather takes no float8): the view dequantized
        table = g.op("DequantizeLinear", _stored(g, name, r0, r1), _stored(g, name + SCALES, r0, r1), axis=1,
                     block_size=b)
        if len(lead) > 1:
            table = g.op("Reshape", table, g.const([*lead, K]))
        return g.op("Gather", table, ids, axis=0)
    codes = g.op("Cast", g.op("Gather", _external(g, name, (*lead, K), r0, r1), ids, axis=0), to=TensorProto.FLOAT)
    scales = g.op("Unsqueeze", g.op("Gather", S, ids, axis=0), g.const([-1]))  # [a, c, *lead[1:], K/b, 1]
    w = g.op("Mul", g.op("Reshape", codes, g.const([0, 0, *lead[1:], K // b, b])), scales)
    return g.op("Reshape", w, g.const([0, 0, *lead[1:], K]))


def dequantized_model(model, wf: QuantWeightFile):
    """A float copy of ``model`` whose quantized weights are quant.dequantize of ``wf``'s codes: the torch
    reference a quantized build must match (tests, validate)."""
    import copy

    ref = copy.deepcopy(model)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    for name in wf.lowering:
        sd[name] = quant.dequantize(*codes_and_scales(wf, name)).reshape(sd[name].shape)
    ref.load_state_dict(sd)  # (also drops the weight views the model caches per budget)
    return ref


def codes_and_scales(wf: QuantWeightFile, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [N, K] int8 / float8, scales [N, K/b]) of a stored quantized tensor, unpacked (stacked
    experts flat: [E*R, K])."""
    data, s = wf.data[name], wf.data[name + SCALES]
    if wf.lowering[name] != "MatMulNBits":
        return data, s
    N = data.shape[0]
    if wf.spec.format == "int4":
        return quant.unpack_int4(data.reshape(N, -1)), s
    return (data.reshape(N, -1).to(torch.int16) - 128).to(torch.int8), s


def check_opset(opset: int, fmt: str | None) -> int:
    """Quantized graphs use opset-21 blocked DequantizeLinear: at least 21."""
    if fmt is not None and opset < 21:
        raise ConfigError(f"opset {opset} has no blocked DequantizeLinear", field="opset",
                          fix="use --opset 21 or later with --quant")
    return opset


def model_nodes(proto: onnx.ModelProto) -> dict[str, int]:
    """Op type -> count (for reports and tests)."""
    out: dict[str, int] = {}
    for n in proto.graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out
