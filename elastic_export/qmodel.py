"""The torch model of a quantized checkpoint: one quantized weight copy, dequantized a layer at a time.

:class:`QuantizedNemotronH` is the elastic model (:mod:`elastic_export.model`) whose quantized weights
are meta tensors (shape and strides only) beside their codes and scales (:class:`QWeight`, as
:mod:`elastic_export.quant` writes them; int4 stays packed two codes a byte). The elastic rule is
unchanged: a budget's views are views of the meta weights, and what a view keeps (its shape, strides
and offset into the family tensor) is read off the meta view and applied to the codes and to the
scales (a block of ``b`` columns is one scale: strides and offset divided by ``b``; packed int4 two
columns a byte: divided by 2). So a layer dequantizes exactly the rows and columns its budget
computes with, just before it runs (``layer_weights``, the hook of model.py), and drops them after:
resident memory is the quantized bytes plus one layer's slice in float, never a float copy of the
model. The embedding dequantizes only the rows looked up, lm_head a block of rows at a time.

Dequantization is ``codes.float() * scale`` in float32 (then the compute dtype), bit for bit what
:func:`elastic_export.quant.dequantize` gives, so this model's logits equal those of the float model
holding the dequantized weights (:func:`dequantized_model`) up to summation order.

int4 and int8 weights on a CPU take torch's own int4 / int8 kernels instead (:mod:`elastic_export.qkernels`;
on by default, :meth:`QuantizedNemotronH.use_kernels` turns them off): each such family tensor is laid
out once for its kernel, the layer hands its views to the model as :class:`QView` objects, and
``F.linear`` on a QView runs the kernel on the budget's rows and columns of the one packed copy. No
layer is ever dequantized; anything else done with a QView (a view the kernel cannot take, einsum)
dequantizes that view first, so the model's code is the same for every path.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .model import NemotronHForCausalLM

HEAD_CHUNK = 1 << 22  # lm_head rows dequantized at once: ~4M weights (16 MB in float32)


class QWeight(NamedTuple):
    """One quantized tensor: codes int8 / float8_e4m3fn [..., N, K] or int4 packed uint8 [..., N, K/2],
    float32 scales [..., N, K/b]."""
    codes: torch.Tensor
    scales: torch.Tensor
    block: int
    packed: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, k = self.codes.shape
        return (*lead, 2 * k if self.packed else k)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()


def _region(t: torch.Tensor, view: torch.Tensor, unit: int) -> torch.Tensor:
    """The part of ``t`` that a view of the family tensor keeps, when ``t`` holds one entry per
    ``unit`` consecutive columns of it (codes 1, packed int4 2, scales the block)."""
    shape, stride, off = view.shape, view.stride(), view.storage_offset()
    lead = [(n, s) for n, s in zip(shape[:-1], stride[:-1])]
    if not shape or (shape[-1] > 1 and stride[-1] != 1) or shape[-1] % unit or off % unit or \
            any(n > 1 and s % unit for n, s in lead):
        raise ValueError(f"a view {tuple(shape)} / {tuple(stride)} + {off} cuts blocks of {unit} columns")
    return t.as_strided((*shape[:-1], shape[-1] // unit), (*[s // unit if n > 1 else 0 for n, s in lead], 1),
                        t.storage_offset() + off // unit)


def _unpack_float(p: torch.Tensor) -> torch.Tensor:
    """Packed int4 bytes [..., c/2] -> float32 codes [..., c] (quant.unpack_int4), one float buffer."""
    q = torch.empty(*p.shape[:-1], 2 * p.shape[-1])
    q[..., 0::2] = p & 0x0F
    q[..., 1::2] = p >> 4
    return q.sub_(8)


def _codes_float(qw: QWeight, view: torch.Tensor) -> torch.Tensor:
    if not qw.packed:
        return _region(qw.codes, view, 1).float()
    return _unpack_float(_region(qw.codes, view, 2))


def _dequant(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float codes [..., c] (overwritten) and scales [..., c/b] -> weights [..., c], in place
    (quant.dequantize's arithmetic: one float32 buffer per tensor, no temporaries)."""
    q.unflatten(-1, (s.shape[-1], -1)).mul_(s.float().unsqueeze(-1))
    return q if dtype == torch.float32 else q.to(dtype)


def dequantize_view(qw: QWeight, view: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weights [view.shape] a meta view of a quantized family tensor stands for (only those)."""
    return _dequant(_codes_float(qw, view), _region(qw.scales, view, qw.block), dtype)


def dequantize_rows(qw: QWeight, view: torch.Tensor, ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """``dequantize_view(qw, view)[ids]`` without dequantizing the other rows (embedding lookups)."""
    if qw.packed:
        q = _unpack_float(_region(qw.codes, view, 2)[ids])
    else:
        q = _region(qw.codes, view, 1)[ids].float()
    return _dequant(q, _region(qw.scales, view, qw.block)[ids], dtype)


class QView:
    """A meta view of a quantized family tensor whose ``F.linear`` runs its kernel (int4 / int8). Tensor
    methods act on the meta view (a view of a view stays a QView); any other torch function, or a
    method whose result is not a view of the family tensor, gets the dequantized weights."""

    __slots__ = ("t", "qw", "pk")

    def __init__(self, t: torch.Tensor, qw: QWeight, pk):
        self.t, self.qw, self.pk = t, qw, pk

    def dense(self) -> torch.Tensor:
        return dequantize_view(self.qw, self.t, self.t.dtype)

    def _wrap(self, r):
        if isinstance(r, torch.Tensor) and r.is_meta:
            return QView(r, self.qw, self.pk) if r._base is not None else None
        if isinstance(r, (tuple, list)):
            vals = [self._wrap(e) for e in r]
            return None if any(v is None for v in vals) else type(r)(vals)
        return r

    def __getattr__(self, name):
        a = getattr(self.t, name)
        if not callable(a):
            return a

        def call(*args, **kwargs):
            r = self._wrap(a(*args, **kwargs))
            return getattr(self.dense(), name)(*args, **kwargs) if r is None else r
        return call

    @property
    def shape(self):
        return self.t.shape

    def _einsum(self, eq: str, x: torch.Tensor) -> torch.Tensor | None:
        """model.py's per-head products over a view that keeps a prefix of each head's rows or
        columns (a budget's smaller head dim): the kernel on the whole heads' run of rows or columns,
        the extra outputs dropped, or the extra inputs zero (exact)."""
        t = self.t
        base = t if t._base is None else t._base
        if t.dim() != 3 or base.dim() != 2 or t.stride(2) != 1:
            return None
        K = base.shape[1]
        if eq == "...d,hpd->...hp":  # W [h, p, d]: heads' rows [h, P] with p <= P kept
            h, p, d = t.shape
            if t.stride(1) != K or t.stride(0) % K:
                return None
            P = t.stride(0) // K
            cover = base.as_strided((h * P, d), (K, 1), t.storage_offset())
            y = self.pk.linear(x, cover)
            return None if y is None else y.unflatten(-1, (h, P))[..., :p]
        if eq == "...hp,dhp->...d":  # W [d, h, p]: heads' columns [h, P] with p <= P kept
            d, h, p = t.shape
            if t.stride(0) != K or t.stride(1) < p:
                return None
            P = t.stride(1)
            cover = base.as_strided((d, h * P), (K, 1), t.storage_offset())
            return self.pk.linear(F.pad(x, (0, P - p)).flatten(-2), cover)
        return None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and isinstance(args[1], QView) and not isinstance(args[0], QView):
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            y = args[1].pk.linear(args[0], args[1].t, bias)
            if y is not None:
                return y
        if func is torch.einsum and len(args) == 3 and isinstance(args[2], QView) and not isinstance(args[1], QView):
            y = args[2]._einsum(args[0], args[1])
            if y is not None:
                return y
        dense = functools.partial(_map_views, f=QView.dense)
        return func(*dense(args), **{k: dense(v) for k, v in kwargs.items()})


def _map_views(x, f):
    if isinstance(x, QView):
        return f(x)
    if isinstance(x, (tuple, list)):
        return type(x)(_map_views(e, f) for e in x)
    return x


def _meta_views(v) -> list[torch.Tensor]:
    """The meta (quantized) tensors among a layer's views."""
    metas: list = []
    _map(v, lambda t: metas.append(t) if t.is_meta else None)
    return metas


def _map(x, f):
    """f applied to every tensor of a (nested) tuple of views."""
    if isinstance(x, torch.Tensor):
        return f(x)
    if isinstance(x, tuple):
        vals = [_map(e, f) for e in x]
        return type(x)(*vals) if hasattr(x, "_fields") else tuple(vals)
    return x


class QuantizedNemotronH(NemotronHForCausalLM):
    """The elastic model over quantized weights (see the module docstring). ``qweights``: state-dict
    name -> QWeight; ``quantization``: the spec and plan it was written with (a manifest entry)."""

    qweights: dict
    quantization: dict
    kernels: dict | None = None  # name -> qkernels.PackedInt4 / PackedInt8 of the tensors laid out so far
    use_kernel: bool = True

    def use_kernels(self, on: bool = True) -> "QuantizedNemotronH":
        """Run int4 / int8 weights through torch's CPU kernels (on: the default; each tensor is packed
        the first time a layer multiplies by it) or drop the packed copies and dequantize every layer
        instead (off: the exact float32 path)."""
        self.use_kernel, self.kernels = on, {}
        return self

    @property
    def device(self) -> torch.device:
        return self.backbone.norm_f.weight.device

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.backbone.norm_f.weight.dtype

    def quantized_bytes(self) -> int:
        return sum(q.nbytes for q in self.qweights.values())

    def _qweight(self, t: torch.Tensor) -> QWeight | None:
        base = t if t._base is None else t._base
        names = getattr(self, "_param_names", None)
        if names is None or id(base) not in names:
            names = self._param_names = {id(p): n for n, p in self.named_parameters()}
        name = names.get(id(base))
        return None if name is None else self.qweights.get(name)

    def _kernel(self, t: torch.Tensor):
        """The kernel's copy of the family tensor behind meta view ``t`` (qkernels.PackedInt4 / PackedInt8,
        made on first use), or None where no kernel applies."""
        from . import qkernels

        qw = self._qweight(t) if self.use_kernel and t.is_meta else None
        if qw is None or self.device.type != "cpu":
            return None
        kind = qkernels.PackedInt4 if qkernels.fits(qw) else qkernels.PackedInt8 if qkernels.fits_int8(qw) else None
        if kind is None:
            return None
        base = t if t._base is None else t._base
        name = self._param_names[id(base)]
        if self.kernels is None:
            self.kernels = {}
        if name not in self.kernels:
            self.kernels[name] = kind(qw)
            drop = getattr(self, "_drop_pages", None)
            if drop is not None:  # its codes' file pages: read again only if a fallback path needs them
                drop(name)
        return self.kernels[name]

    def _dequant(self, t: torch.Tensor, whole: dict) -> torch.Tensor:
        if not t.is_meta:
            return t
        qw = self._qweight(t)
        if qw is None:
            raise RuntimeError("a weight view has no data and no quantized weights behind it")
        base = t if t._base is None else t._base
        full = whole.get(id(base))
        if full is not None:  # the layer uses the whole tensor: one dequantization, views of it
            return full.as_strided(t.shape, t.stride(), t.storage_offset())
        return dequantize_view(qw, t, self.compute_dtype)

    def layer_weights(self, blk, v, c=None):
        """Dequantize the slices of a layer's views just before it runs (freed when it returns)."""
        whole: dict = {}
        metas = _meta_views(v)
        if not metas:  # float views, or a step plan's kernel views (step_plan): nothing to do per call
            return v, c
        kern = {id(t): self._kernel(t) for t in metas}  # int4 views the kernel takes: no dequantization
        metas = [t for t in metas if kern[id(t)] is None]
        for t in metas:  # a view that is its whole tensor (the full budget's fused in_proj)
            base = t if t._base is None else t._base
            if id(base) not in whole and t.numel() == base.numel() and t.is_contiguous() and not t.storage_offset():
                whole[id(base)] = dequantize_view(self._qweight(t), base, self.compute_dtype)
        v = _map(v, lambda t: QView(t, self._qweight(t), kern[id(t)]) if kern.get(id(t)) is not None
                 else self._dequant(t, whole))
        if c is not None:
            c = blk.mixer.step_constants(v)  # its out_proj / z, x views, now of the float slices
        return v, c

    def step_plan(self, subnet=None):
        """The decode step's plan (model.step_plan), its layers already on the kernels where all of a
        layer's quantized views take it: their QViews and step constants are made once per budget, not
        once per token (a plan made before use_kernels(False) keeps them)."""
        plan = super().step_plan(subnet)
        layers = []
        for layer in plan.layers:
            if layer is not None:
                blk, norm, v, c = layer
                metas = _meta_views(v)
                if metas and all(self._kernel(t) is not None for t in metas):
                    v, c = self.layer_weights(blk, v, c)
                    layer = (blk, norm, v, c)
            layers.append(layer)
        return plan._replace(layers=tuple(layers))

    def embed(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if not weight.is_meta:
            return F.embedding(ids, weight)
        return dequantize_rows(self._qweight(weight), weight, ids, self.compute_dtype)

    def project(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if not weight.is_meta:
            return F.linear(h, weight)
        qw = self._qweight(weight)
        pk = self._kernel(weight)
        y = None if pk is None else pk.linear(h, weight)
        if y is not None:
            return y
        rows = max(1, HEAD_CHUNK // weight.shape[-1])
        return torch.cat([F.linear(h, dequantize_view(qw, weight[r:r + rows], self.compute_dtype))
                          for r in range(0, weight.shape[0], rows)], dim=-1)


def quantized_model(cfg, tensors: dict[str, torch.Tensor], qweights: dict[str, QWeight],
                    quantization: dict) -> QuantizedNemotronH:
    """A :class:`QuantizedNemotronH` from its float-kept tensors and its quantized ones."""
    from .errors import CheckpointError

    with torch.device("meta"):
        m = QuantizedNemotronH(cfg)
    state = {}
    for name, p in m.state_dict().items():
        if name in qweights:
            if tuple(qweights[name].shape) != tuple(p.shape):
                raise CheckpointError(f"quantized tensor {name!r} has shape {tuple(qweights[name].shape)}, the "
                                      f"config implies {tuple(p.shape)}", fix="the weights do not match the config")
            state[name] = torch.empty(p.shape, device="meta")
        elif name in tensors:
            state[name] = tensors[name]
        else:
            raise CheckpointError(f"tensor {name!r} is missing", fix="the weights do not match the config")
    m.load_state_dict(state, assign=True)
    m.qweights, m.quantization = dict(qweights), dict(quantization)
    return m.eval()


def qweight_codes(qw: QWeight) -> torch.Tensor:
    """Unpacked codes (int8 / float8_e4m3fn) [..., N, K]."""
    from .quant import unpack_int4

    return unpack_int4(qw.codes) if qw.packed else qw.codes


@torch.no_grad()
def dequantized_model(qm: QuantizedNemotronH, dtype: torch.dtype | None = None) -> NemotronHForCausalLM:
    """The float model holding every dequantized weight (the reference of the quantized one)."""
    from .elastic import full_subnet
    from .quant import dequantize

    with torch.device("meta"):
        m = NemotronHForCausalLM(qm.config)
    state = {}
    for name, t in qm.state_dict().items():
        qw = qm.qweights.get(name)
        state[name] = dequantize(qweight_codes(qw), qw.scales, dtype or qm.compute_dtype) if qw is not None else \
            t.clone()
    m.load_state_dict(state, assign=True)
    m.budgets = dict(getattr(qm, "budgets", None) or {"full": full_subnet(qm.config)})
    return m.eval()
