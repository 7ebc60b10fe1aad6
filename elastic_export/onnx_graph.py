"""A tiny ONNX graph builder and the family weight file that every budget's graphs read.

The weight file (``weights.bin``) holds each parameter of the nested checkpoint once, at the build
dtype, each tensor aligned to 64 bytes. Output-side projections (``out_proj``, ``o_proj``,
``down_proj``) are stored transposed, [in, out], so that every large matrix a budget needs is a
*row range* of a stored tensor: contiguous on disk and in memory, referenced by (offset, length)
with no copy. Prefixes on the other axis (embedding width, Mamba head channels) are applied to
activations instead (zero-pad the input, slice the output), never to weights; see onnx_export.

MoE weights (onnx_moe): the stacked experts keep transformers' layout, ``experts.up_proj`` [E, F, din]
and ``experts.down_proj`` [E, din, F] (the layout of ONNX Runtime's contrib MoE operator too), so a
prefix of experts is a row range; ``up_proj`` is also read flat, [E*F, din] (``rows(..., flat=True)``).
The shared expert's ``down_proj`` is stored transposed like an MLP's. The router (``gate.weight``,
``gate.e_score_correction_bias``) stays float32 whatever the build dtype, as in the model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

WEIGHTS_FILE = "weights.bin"
ALIGN = 64
TRANSPOSED = ("mixer.out_proj.weight", "mixer.o_proj.weight", "mixer.down_proj.weight",
              "shared_experts.down_proj.weight")
FLOAT32_KEPT = ("gate.weight", "gate.e_score_correction_bias")  # MoE routers: float32 at every dtype
NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16}
ONNX_DTYPES = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
               torch.bfloat16: TensorProto.BFLOAT16,
               torch.uint8: TensorProto.UINT8, torch.int8: TensorProto.INT8,  # quantized codes (onnx_quant)
               torch.float8_e4m3fn: TensorProto.FLOAT8E4M3FN}


def np_dtype(dtype: torch.dtype):
    """The numpy dtype of a torch float dtype (bfloat16 through ml_dtypes, which onnx uses too)."""
    if dtype == torch.bfloat16:
        import ml_dtypes

        return ml_dtypes.bfloat16
    return NP_DTYPES[dtype]


def is_transposed(name: str) -> bool:
    return name.endswith(TRANSPOSED)


def keeps_float32(name: str) -> bool:
    return any(name == s or name.endswith("." + s) for s in FLOAT32_KEPT)


CHUNK_BYTES = 8 << 20  # at most this much of a tensor is converted or transposed at a time while writing


def _raw(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's bytes as a numpy view (no copy; bfloat16 reinterpreted as int16)."""
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _chunks(t: torch.Tensor, dtype: torch.dtype, transposed: bool):
    """``t`` (or its transpose) at ``dtype`` as contiguous row blocks of about CHUNK_BYTES each: a tensor
    already stored as written is yielded as it is, whole; any conversion or transpose runs block by
    block, so writing never holds a second copy of a tensor, only one block (issue 13)."""
    t = t.detach().cpu()
    src = t.t() if transposed else t
    if not transposed and t.dtype == dtype and t.is_contiguous():
        yield src
        return
    row = max(1, int(np.prod(src.shape[1:], dtype=np.int64)) * max(t.element_size(), torch.empty((), dtype=dtype).element_size()))
    step = max(1, CHUNK_BYTES // row)
    if src.dim() == 0:
        yield src.to(dtype).contiguous()
        return
    for r in range(0, src.shape[0], step):
        yield src[r:r + step].to(dtype).contiguous()


def external_tensor(name: str, data_type: int, dims, location: str, offset: int, nbytes: int) -> TensorProto:
    """An initializer whose bytes lie in the weight file ``location`` at ``offset`` (``nbytes`` long)."""
    t = TensorProto()
    t.name = name
    t.data_type = data_type
    t.dims.extend(dims)
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(nbytes))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


class WeightFile:
    """Layout of the family weight file: tensor name -> (byte offset, stored shape); each tensor at
    ``dtype`` except the float32-kept ones (``dtypes``)."""

    def __init__(self, model, dtype: torch.dtype):
        self.dtype = dtype
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.entries: dict[str, tuple[int, tuple[int, ...]]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.params: dict[str, torch.Tensor] = {}
        off = 0
        for name, p in model.state_dict(keep_vars=True).items():  # lm_head.weight unless the model is tied
            shape = tuple(p.shape[::-1]) if is_transposed(name) else tuple(p.shape)
            off = (off + ALIGN - 1) // ALIGN * ALIGN
            self.entries[name] = (off, shape)
            self.dtypes[name] = torch.float32 if keeps_float32(name) else dtype
            self.params[name] = p
            off += p.numel() * self.item(name)
        self.nbytes = off

    def item(self, name: str) -> int:
        """Bytes per element of a stored tensor."""
        return torch.empty((), dtype=self.dtypes[name]).element_size()

    def write(self, path: Path, after=None) -> str:
        """Write the file; return its SHA-256. Tensors go out block by block (see _chunks); ``after()``,
        when given, runs after each tensor (the build hands the source's pages back there)."""
        sha = hashlib.sha256()
        with open(path, "wb") as f:
            pos = 0
            for name, (off, _) in self.entries.items():
                pad = b"\0" * (off - pos)
                f.write(pad)
                sha.update(pad)
                pos = off
                for block in _chunks(self.params[name], self.dtypes[name], is_transposed(name)):
                    data = _raw(block).reshape(-1).view(np.uint8)
                    f.write(data)
                    sha.update(data)
                    pos += data.nbytes
                if after is not None:
                    after()
        return sha.hexdigest()

    def row_range(self, name: str, r0: int, r1: int, flat: bool = False) -> tuple[int, tuple[int, ...]]:
        """Byte offset and shape of rows [r0, r1) of a stored tensor (contiguous by construction). With
        ``flat`` the tensor is read as 2-D, [prod(shape[:-1]), shape[-1]] (stacked experts as one matrix)."""
        off, shape = self.entries[name]
        if flat:
            shape = (int(np.prod(shape[:-1], dtype=np.int64)), shape[-1])
        row = int(np.prod(shape[1:], dtype=np.int64)) * self.item(name)
        return off + r0 * row, (r1 - r0, *shape[1:])


class GraphBuilder:
    """Collects nodes, initializers and I/O for one graph; names are generated unless given."""

    def __init__(self, wf: WeightFile, location: str = WEIGHTS_FILE, compute: torch.dtype = torch.float32):
        self.wf = wf
        self.location = location
        self.compute = ONNX_DTYPES[compute]  # element type of activations and matmuls (see onnx_export)
        self.compute_np = np_dtype(compute)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.domains: dict[str, int] = {}
        self._n = 0
        self._consts: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def op(self, op_type: str, *inputs: str, n_out: int = 1, name: str | None = None, domain: str = "",
           out: list[str] | None = None, **attrs):
        outs = out or [self.fresh(name or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=np.int64) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self.fresh("const")
            self.inits[name] = numpy_helper.from_array(arr, name)
            self._consts[key] = name
        return self._consts[key]

    def inline(self, t: torch.Tensor, hint: str, compute: bool = False) -> str:
        """A small tensor (conv kernel, norm weight, per-head vector) stored inside the graph: float32,
        or at the compute dtype (``compute``: biases added to matmul outputs)."""
        name = self.fresh(hint)
        arr = t.detach().float().contiguous().cpu().numpy()
        self.inits[name] = numpy_helper.from_array(arr.astype(self.compute_np) if compute else arr, name)
        return name

    def cconst(self, value) -> str:
        """A constant at the compute dtype."""
        return self.const(value, self.compute_np)

    def cast(self, x: str, elem: int) -> str:
        """Cast ``x`` (known to be float32 or the compute dtype) to ``elem``; no node when the compute
        dtype is float32 (then every float tensor already is)."""
        if self.compute == TensorProto.FLOAT:
            return x
        return self.op("Cast", x, to=elem)

    def to_f32(self, x: str) -> str:
        return self.cast(x, TensorProto.FLOAT)

    def to_compute(self, x: str) -> str:
        return self.cast(x, self.compute)

    def rows(self, name: str, r0: int, r1: int, dtype: int | None = None, flat: bool = False) -> str:
        """Rows [r0, r1) of a stored tensor (of its 2-D view with ``flat``, see WeightFile.row_range),
        read from the weight file with no copy; cast when the stored dtype is not ``dtype`` (default:
        the compute dtype)."""
        key = f"{name}[{r0}:{r1}]" + ("flat" if flat else "")
        stored = ONNX_DTYPES[self.wf.dtypes[name]]
        if key not in self.inits:
            off, shape = self.wf.row_range(name, r0, r1, flat)
            nbytes = int(np.prod(shape, dtype=np.int64)) * self.wf.item(name)
            self.inits[key] = external_tensor(key, stored, shape, self.location, off, nbytes)
        want = self.compute if dtype is None else dtype
        if want != stored:
            return self.op("Cast", key, to=want, name="wcast")
        return key

    def input(self, name: str, elem: int, shape) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, value: str, name: str, elem: int, shape) -> str:
        """Expose ``value`` as graph output ``name``: rename it in place (no Identity node) unless it is
        a graph input or already an output under another name."""
        if value != name:
            taken = {i.name for i in self.inputs} | {o.name for o in self.outputs} | set(self.inits)
            if value in taken:
                self.op("Identity", value, out=[name])
            else:
                for n in self.nodes:
                    n.input[:] = [name if x == value else x for x in n.input]
                    n.output[:] = [name if x == value else x for x in n.output]
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def model(self, graph_name: str, opset: int) -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, list(self.inits.values()))
        opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in self.domains.items()]
        m = helper.make_model(g, opset_imports=opsets, producer_name="elastic-export")
        m.ir_version = helper.find_min_ir_version_for(opsets, ignore_unknown=True)
        return m
