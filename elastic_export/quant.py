"""Nested weight quantization: one quantized weight copy that every budget slices.

A weight ``W [..., N, K]`` (rows = outputs, K = inputs) is quantized symmetrically per row and per
block of ``b`` consecutive input columns: block ``(n, j)`` holds ``W[n, j*b:(j+1)*b]`` and gets one
float32 scale ``s = absmax / qmax`` (or the clip a search chooses, :func:`block_scales`); its codes are
``q = clamp(round(W / s), -qmax, qmax)``. Everything a block's codes and scale depend on lies in the
block itself, so the elastic rule (which keeps rows, reorders rows by head, and keeps column prefixes)
commutes with quantization as long as every budget keeps whole blocks: slicing the quantized family
equals quantizing the sliced budget, bit for bit. :func:`quant_plan` chooses each tensor's block so
that it does (the largest power of two <= the requested block that divides the input width of every
budget; Mamba out_proj and attention o_proj blocks must also divide the head widths, since heads move
as wholes) and refuses, naming tensor, budget and width, when that would go below ``min_block``.

Formats (``FORMATS``):
    int8  codes in [-127, 127] (int8)                      block 128 by default
    int4  codes in [-7, 7] (int8 here; :func:`pack_int4`)   block 32 by default (32 / 64 / 128)
    fp8   float8_e4m3fn codes, |x| <= 448                  block 128 by default

Kept in high precision (never quantized, :func:`quantizable`): norms, biases, the conv1d weights, the
SSM parameters ``A_log`` / ``D`` / ``dt_bias``, the MoE router (``gate.weight`` and its bias); the
SSM and conv states are activations and stay float32 in every engine. Embeddings and lm_head are a
choice (``QuantSpec.embeddings`` / ``lm_head``); both are quantized by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import BudgetError, ConfigError


@dataclass(frozen=True)
class Format:
    name: str
    qmax: float
    default_block: int
    code_dtype: torch.dtype
    bits: int


FORMATS = {
    "int8": Format("int8", 127.0, 128, torch.int8, 8),
    "int4": Format("int4", 7.0, 32, torch.int8, 4),
    "fp8": Format("fp8", 448.0, 128, torch.float8_e4m3fn, 8),
}
METHODS = ("rtn", "mse")  # round to nearest at absmax; or the clip that minimizes (weighted) squared error
MSE_GRID = tuple(1.0 - 0.025 * i for i in range(21))  # clip ratios 1.0 .. 0.5 tried by "mse"

# tensors that stay in high precision (suffix match on the state-dict name)
FLOAT_KEPT = ("norm.weight", "norm_f.weight", ".bias", "conv1d.weight", "A_log", ".D", "dt_bias",
              "mixer.gate.weight", "e_score_correction_bias")
EMBEDDINGS = "backbone.embeddings.weight"
LM_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize and how. ``block`` None takes the format's default."""
    format: str = "int8"
    block: int | None = None
    method: str = "rtn"
    embeddings: bool = True
    lm_head: bool = True
    min_block: int = 8

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ConfigError(f"unknown quantization format {self.format!r}", field="quant",
                              fix=f"use one of {', '.join(FORMATS)}")
        if self.method not in METHODS:
            raise ConfigError(f"unknown quantization method {self.method!r}", field="quant_method",
                              fix=f"use one of {', '.join(METHODS)}")
        b = self.block_size
        if b < 2 or b & (b - 1):
            raise ConfigError(f"block size {b} is not a power of two >= 2", field="quant_block",
                              fix="use 32, 64 or 128")

    @property
    def fmt(self) -> Format:
        return FORMATS[self.format]

    @property
    def block_size(self) -> int:
        return self.block or FORMATS[self.format].default_block

    def to_dict(self) -> dict:
        return {"format": self.format, "block": self.block_size, "method": self.method,
                "embeddings": self.embeddings, "lm_head": self.lm_head, "min_block": self.min_block}


def quantizable(name: str, spec: QuantSpec) -> bool:
    """Whether state-dict tensor ``name`` is quantized under ``spec`` (2-D+ matmul weights only)."""
    if name == EMBEDDINGS:
        return spec.embeddings
    if name == LM_HEAD:
        return spec.lm_head
    if any(name.endswith(s) for s in FLOAT_KEPT):
        return False
    return name.endswith((".weight", "experts.up_proj", "experts.down_proj"))


# ---- the arithmetic (one block rule for every format) --------------------------------------------

def _blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """[..., N, K] -> [..., N, K/b, b] float32 (K must be a multiple of b)."""
    K = w.shape[-1]
    if K % block:
        raise BudgetError(f"input width {K} is not a multiple of the quantization block {block}",
                          field="quant_block", fix="choose a block that divides every budget's widths")
    return w.float().unflatten(-1, (K // block, block))


def _codes(wb: torch.Tensor, s: torch.Tensor, fmt: Format) -> torch.Tensor:
    x = wb / s.unsqueeze(-1)
    if fmt.name == "fp8":
        return x.clamp(-fmt.qmax, fmt.qmax).to(torch.float8_e4m3fn)
    return torch.round(x).clamp(-fmt.qmax, fmt.qmax)


def block_scales(wb: torch.Tensor, fmt: Format, method: str = "rtn",
                 importance: torch.Tensor | None = None) -> torch.Tensor:
    """Scales [..., N, K/b] for blocked weights ``wb`` [..., N, K/b, b]. ``rtn``: absmax / qmax.
    ``mse``: the clip ratio of ``MSE_GRID`` minimizing the block's squared error, weighted by
    ``importance`` [K] (mean squared input activation per column, as llama.cpp's importance matrix;
    activation-aware when given). Computed per block in float64, so a block's scale is the same
    wherever the block sits (prefix safety)."""
    amax = wb.abs().amax(-1)
    base = torch.where(amax > 0, amax / fmt.qmax, torch.ones_like(amax))
    if method == "rtn":
        return base
    w64 = wb.double()
    if importance is None:
        imp = torch.ones(wb.shape[-2:], dtype=torch.float64)  # [K/b, b]
    else:  # [K] (one per input column) or [E, K] (stacked experts: one per expert and column)
        imp = importance.double().unflatten(-1, wb.shape[-2:])
        if imp.dim() > 2:
            imp = imp.unsqueeze(-3)  # [E, 1, K/b, b]: the same weights for every row of an expert
    best, best_err = base, None
    for r in MSE_GRID:
        s = base * r
        q = _codes(wb, s, fmt)
        err = ((w64 - q.double() * s.double().unsqueeze(-1)) ** 2 * imp).sum(-1)
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best = torch.where(better, s, best)
            best_err = torch.where(better, err, best_err)
    return best


def quantize(w: torch.Tensor, spec: QuantSpec, block: int | None = None,
             importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [..., N, K], scales float32 [..., N, K/b]) of weight ``w`` at ``block`` (default: the
    spec's). int codes are int8 (int4 unpacked); fp8 codes float8_e4m3fn."""
    fmt = spec.fmt
    b = block or spec.block_size
    wb = _blocks(w, b)
    s = block_scales(wb, fmt, spec.method, importance)
    q = _codes(wb, s, fmt)
    if fmt.name != "fp8":
        q = q.to(torch.int8)
    return q.flatten(-2), s.float()


def dequantize(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes [..., N, K] and scales [..., N, K/b] -> weight [..., N, K] at ``dtype``."""
    b = q.shape[-1] // s.shape[-1]
    w = q.float().unflatten(-1, (s.shape[-1], b)) * s.float().unsqueeze(-1)
    return w.flatten(-2).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 codes [..., K] in [-7, 7] (int8) -> uint8 [..., K/2]: value + 8 in [1, 15], the even
    column in the low nibble (ONNX Runtime MatMulNBits' order, zero point 8)."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    lo = (p & 0x0F).to(torch.int8) - 8
    hi = (p >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], -1).flatten(-2)


# ---- the plan: one block per tensor that every budget keeps whole --------------------------------

def _input_widths(cfg, subnets: dict, i: int | None, kind: str) -> list[tuple[str, int]]:
    """(who, width) for every input width tensor kind ``kind`` of layer ``i`` takes in the family's
    budgets (``subnets``: name -> Subnet; layers a budget skips take none), plus the widths a column
    block must not straddle (the head width, who = "head")."""
    field = {"mamba_out": "mamba_head_dim", "ffn": "ffn", "expert_ffn": "expert_ffn",  # heads move as wholes,
             "shared_ffn": "shared_ffn"}.get(kind)                                     # each keeps a p-prefix
    widths = []
    for who, s in subnets.items():
        if kind == "hidden":
            widths.append((who, s.hidden))
        elif field is not None and s.layers[i].kept:
            widths.append((who, getattr(s.layers[i], field)))
    if kind == "mamba_out":
        widths.append(("head", cfg.layer_dims(i)["mamba_head_dim"]))
    elif kind == "attn_out":
        widths.append(("head", cfg.head_dim))
    return widths


def _input_kind(name: str, latent: bool = False) -> tuple[int | None, str]:
    """(layer index, which input width) of a quantizable family tensor."""
    if name in (EMBEDDINGS, LM_HEAD):
        return None, "hidden"
    parts = name.split(".")
    i = int(parts[2])  # backbone.layers.{i}.mixer....
    tail = ".".join(parts[4:])
    if tail == "out_proj.weight":
        return i, "mamba_out"
    if tail == "o_proj.weight":
        return i, "attn_out"
    if tail in ("down_proj.weight",):
        return i, "ffn"
    if tail == "experts.down_proj" or (tail.startswith("experts.") and tail.endswith("down_proj.weight")):
        return i, "expert_ffn"
    if tail == "shared_experts.down_proj.weight":
        return i, "shared_ffn"
    if tail == "fc2_latent_proj.weight" or (tail.startswith("experts.") and latent):
        return i, "latent"  # the latent width is not an elastic axis
    return i, "hidden"


def quant_plan(cfg, budgets: dict, state_shapes: dict[str, tuple[int, ...]], spec: QuantSpec) -> dict[str, int]:
    """Family tensor name -> its column block, for every quantized tensor of the family whose
    shapes are ``state_shapes`` and whose budgets (name -> Subnet) are ``budgets``. BudgetError
    names the tensor, the budget and the width when the block would drop below ``min_block``."""
    from .elastic import full_subnet

    subnets = {"full": full_subnet(cfg), **budgets}
    plan = {}
    for name, shape in state_shapes.items():
        if not quantizable(name, spec) or len(shape) < 2:
            continue
        i, kind = _input_kind(name, getattr(cfg, "moe_latent_size", None) is not None)
        widths = [("full", shape[-1])] + ([] if kind == "latent" else _input_widths(cfg, subnets, i, kind))
        g = 0
        for _, w in widths:
            g = math.gcd(g, w)
        b = spec.block_size
        while b > 1 and g % b:
            b //= 2
        if b < spec.min_block:
            bad = next(((who, w) for who, w in widths if w % spec.min_block and who != "head"), None)
            where = f" (budget {bad[0]}: width {bad[1]})" if bad else ""
            raise BudgetError(f"tensor {name}: its input widths {sorted({w for _, w in widths})} share no block "
                              f"of {spec.min_block} or more columns{where}", field="quant_block",
                              fix=f"use budgets whose widths are multiples of {spec.min_block}, lower "
                                  f"min_block, or keep this tensor in float")
        plan[name] = b
    return plan


def quantize_state(state: dict[str, torch.Tensor], plan: dict[str, int], spec: QuantSpec,
                   importance: dict[str, torch.Tensor] | None = None) -> dict[str, tuple]:
    """name -> (codes, scales) for the planned tensors, name -> tensor for the rest."""
    out = {}
    for name, t in state.items():
        if name in plan:
            out[name] = quantize(t, spec, plan[name], None if importance is None else importance.get(name))
        else:
            out[name] = t
    return out


# ---- slicing a quantized family (the elastic rule applied to codes and scales) -------------------

def budget_plan(cfg, subnet, plan: dict[str, int]) -> dict[str, int]:
    """The family plan renamed to a sliced budget's tensor names (kept layers renumbered)."""
    rename, j = {}, 0
    for i, w in enumerate(subnet.layers):
        if w.kept:
            rename[f"backbone.layers.{i}."] = f"backbone.layers.{j}."
            j += 1
    out = {}
    for name, b in plan.items():
        if name.startswith("backbone.layers."):
            pre = ".".join(name.split(".")[:3]) + "."
            if pre not in rename:
                continue
            name = rename[pre] + name[len(pre):]
        out[name] = b
    return out


@torch.no_grad()
def slice_quantized(model, qstate, plan: dict[str, int], subnet, finish=None) -> tuple[dict, dict[str, int]]:
    """(quantized state of a budget, its plan) from the quantized family ``qstate``
    (:func:`quantize_state` of ``model``'s state, or any mapping that produces a tensor's (codes,
    scales) when asked): the slicer's own rule (elastic views, head reordering, skipped layers)
    applied to the codes and to the scales expanded to one per column, with no arithmetic on either,
    so the result is exactly the quantized sliced budget. ``finish(name, codes, scales, block)``, if
    given, makes what is kept of each sliced tensor (e.g. int4 codes packed at once).

    One tensor at a time: a meta twin of the model gets the one family tensor being sliced (its codes
    as they are, int8 or float8 read as uint8, since the slicer only selects; then its scales expanded
    per column), the slicer's function for the matching budget tensor runs on it
    (:func:`elastic_export.slicing.slice_thunks`: each reads only its own views), and the tensor goes
    back to meta. Memory: the budget's quantized state plus one family tensor in flight (its scales
    per column at float32), never a float copy of the family."""
    from .hf_io import meta_twin
    from .slicing import slice_thunks

    twin = meta_twin(model)
    cfg = model.config
    bplan = budget_plan(cfg, subnet, plan)
    source = {}  # budget tensor name -> family tensor name, for the quantized ones
    for k in plan:
        for name in budget_plan(cfg, subnet, {k: plan[k]}):
            source[name] = k

    def through_slicer(k: str, t: torch.Tensor, name: str) -> torch.Tensor:
        mod, _, attr = k.rpartition(".")
        owner = twin.get_submodule(mod)
        meta = getattr(owner, attr)
        setattr(owner, attr, torch.nn.Parameter(t, requires_grad=False))
        try:
            return slice_thunks(twin, subnet)[name]().detach().contiguous().clone()
        finally:
            setattr(owner, attr, meta)

    thunks = slice_thunks(model, subnet)  # the budget's tensors in order; quantized ones are meta in ``model``
    out = {}
    with torch.no_grad():
        for name, f in thunks.items():
            if name not in bplan:  # kept in float, at its own dtype (slicing.slice_state's copy)
                out[name] = f().detach().clone().contiguous()
                continue
            k = source[name]
            codes, scales = qstate[k]
            as_bytes = codes.dtype == torch.float8_e4m3fn  # selections only: the same bytes as uint8
            q = through_slicer(k, codes.view(torch.uint8) if as_bytes else codes, name)
            q = q.view(codes.dtype) if as_bytes else q
            del codes
            s = through_slicer(k, scales.repeat_interleave(plan[k], -1), name)[..., ::bplan[name]].contiguous()
            out[name] = (q, s) if finish is None else finish(name, q, s, bplan[name])
    return out, bplan
