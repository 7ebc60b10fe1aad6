"""Quantized checkpoints: a quantized nested checkpoint (one copy of codes + scales that every budget
slices) and the per-budget quantized checkpoints ``slice`` writes from it.

Nested (``elastic.json`` ``format_version`` 3, with a ``quantization`` entry; readers up to version 2
refuse it: "upgrade elastic-export")::

    model.safetensors   NAME          codes of a quantized tensor: int8 (int8), float8_e4m3fn (fp8), or
                                      uint8 [..., N, K/2] (int4: two codes a byte, code + 8, the even
                                      column in the low nibble; quant.pack_int4)
                        NAME_scale    float32 [..., N, K/b]: one scale per row and block of b columns
                        other NAME    float tensors kept as they were (norms, conv, A_log, D, dt_bias, ...)
    elastic.json        as version 1/2, plus "quantization": {"format", "block", "method", "embeddings",
                        "lm_head", "min_block", "plan": {NAME: b}, "calibration": {...} or null}
    importance / router / tokenizer: copied from the float checkpoint

The plan (quant.quant_plan) gives each tensor a block that every budget keeps whole, so a budget's
codes and scales are the prefix the elastic rule takes (quant.slice_quantized): slicing this
checkpoint equals quantizing the sliced float budget, bit for bit.

Slices (``slice`` on a quantized nested checkpoint): the budget's HF ``nemotron_h`` checkpoint in the
``compressed-tensors`` layout (transformers, vLLM, llm-compressor read it): config.json carries
``quantization_config`` (quant_method "compressed-tensors", format "pack-quantized" for int4,
"int-quantized" for int8, "float-quantized" for fp8, symmetric weights, strategy "group"); the plan's
blocks become one config group per block size, each targeting its modules by name. A quantized
Linear ``X`` is stored as ``X.weight`` (int8 / float8_e4m3fn codes) or ``X.weight_packed`` (int32: eight
int4 codes a word, the same nibbles as ours) + ``X.weight_shape``, with ``X.weight_scale`` (float32
[N, K/b]). Heterogeneous budgets are written in the compact layout only (the padded one would pad
inside blocks).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import quant
from .errors import BudgetError, CheckpointError, ConfigError
from .qmodel import QWeight, QuantizedNemotronH, qweight_codes, quantized_model
from .safetensors_io import SafetensorsFile, save_tensors

FORMAT_VERSION = 3  # nested: version 2 + quantized weights
SCALE = "_scale"
CODE_DTYPES = {"int8": torch.int8, "int4": torch.uint8, "fp8": torch.float8_e4m3fn}
PACKING = "int4: two codes a byte, code + 8, even column in the low nibble (ONNX Runtime MatMulNBits order)"
CT_FORMATS = {"int4": "pack-quantized", "int8": "int-quantized", "fp8": "float-quantized"}


def is_quantized_nested(path) -> bool:
    f = Path(path) / "elastic.json"
    try:
        return f.is_file() and "quantization" in json.loads(f.read_text())
    except (OSError, ValueError):
        return False


def is_quantized_hf(path) -> bool:
    f = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    try:
        return f.is_file() and (json.loads(f.read_text()).get("quantization_config") or {}).get(
            "quant_method") == "compressed-tensors"
    except (OSError, ValueError, AttributeError):
        return False


# ---- writing the quantized nested checkpoint ---------------------------------------------------------

def quantize_nested(src, out, spec: quant.QuantSpec, calib_ids: torch.Tensor | None = None,
                    calib_info: dict | None = None, progress=None) -> dict:
    """Quantize the float nested checkpoint ``src`` into ``out`` (atomic). ``calib_ids`` [n, L]: token
    windows whose input activations weight the scale search (activation-aware; ``spec.method`` "mse").
    Returns the manifest's ``quantization`` entry."""
    from .nested import IMPORTANCE, MANIFEST, ROUTER, TOKENIZER, WEIGHTS, load_nested, sha256_file
    from .hf_io import atomic_dir

    src = Path(src)
    if is_quantized_nested(src):
        raise CheckpointError("is already quantized", path=src / MANIFEST, field="quantization",
                              fix="quantize the float nested checkpoint it was made from")
    ck = load_nested(src)
    model, cfg = ck.model, ck.config
    sd = model.state_dict()
    budgets = {n: s for n, s in ck.budgets.items() if n != "full"}
    plan = quant.quant_plan(cfg, budgets, {k: tuple(v.shape) for k, v in sd.items()}, spec)
    importance = None
    if calib_ids is not None:
        from .qcalib import input_importance

        if progress:
            progress(f"collecting input activations on {calib_ids.shape[0]} x {calib_ids.shape[1]} tokens")
        importance = input_importance(model, calib_ids)
    tensors = {}
    for name, t in sd.items():
        if name in plan:
            q, s = quant.quantize(t, spec, plan[name], None if importance is None else importance.get(name))
            tensors[name] = quant.pack_int4(q) if spec.format == "int4" else q
            tensors[name + SCALE] = s
        elif name in (quant.EMBEDDINGS, quant.LM_HEAD) or not t.is_floating_point():
            tensors[name] = t.detach().contiguous()  # embeddings / lm_head left unquantized: as stored
        else:  # norms, conv, A_log, D, dt_bias, biases, routers: float32 (the traps need the precision)
            tensors[name] = t.detach().float().contiguous()
    entry = {**spec.to_dict(), "packing": PACKING if spec.format == "int4" else None,
             "plan": plan, "calibration": calib_info if calib_ids is not None else None}
    with atomic_dir(out) as tmp:
        save_tensors(tmp / WEIGHTS, tensors, {"format": "pt"})  # no serialized copy of the tensors
        names = [WEIGHTS]
        for extra in (ROUTER, IMPORTANCE):
            if (src / extra).is_file() and extra in ck.manifest["files"]:
                shutil.copy2(src / extra, tmp / extra)
                names.append(extra)
        if ck.tokenizer_path is not None:
            shutil.copytree(ck.tokenizer_path, tmp / TOKENIZER)
        manifest = {**ck.manifest, "format_version": FORMAT_VERSION,
                    "files": {n: {"sha256": sha256_file(tmp / n), "bytes": (tmp / n).stat().st_size} for n in names},
                    "quantization": entry}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return entry


# ---- reading -------------------------------------------------------------------------------------

def _spec(entry: dict, where: Path) -> quant.QuantSpec:
    try:
        return quant.QuantSpec(entry["format"], int(entry["block"]), entry.get("method", "rtn"),
                               bool(entry.get("embeddings", True)), bool(entry.get("lm_head", True)),
                               int(entry.get("min_block", 8)))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"quantization entry is malformed ({e})", path=where, field="quantization") from None
    except ConfigError as e:
        raise CheckpointError(f"quantization entry: {e}", path=where, field="quantization") from None


def _read(f: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(f, "pt") as sf:
            return {k: sf.get_tensor(k) for k in sf.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"could not be read ({e})", path=f, fix="the file is truncated or corrupt") from None


def _qweights(tensors: dict, plan: dict[str, int], fmt: str, f: Path) -> dict[str, QWeight]:
    """Pop every planned tensor's codes and scales out of ``tensors``, checked against the plan."""
    out = {}
    for name, b in plan.items():
        if name not in tensors or name + SCALE not in tensors:
            raise CheckpointError(f"quantized tensor {name!r} (or its {name + SCALE!r}) is missing", path=f,
                                  fix="the weights do not match elastic.json; re-run elastic-export quantize")
        q, s = tensors.pop(name), tensors.pop(name + SCALE)
        packed = fmt == "int4"
        K = q.shape[-1] * (2 if packed else 1)
        if q.dtype != CODE_DTYPES[fmt] or s.dtype != torch.float32 or K % b or \
                tuple(s.shape) != (*q.shape[:-1], K // b):
            raise CheckpointError(f"tensor {name!r}: codes {q.dtype} {tuple(q.shape)} / scales {s.dtype} "
                                  f"{tuple(s.shape)} do not fit {fmt} blocks of {b}", path=f,
                                  fix="the weights do not match elastic.json; re-run elastic-export quantize")
        out[name] = QWeight(q, s, int(b), packed)
    return out


def load_quantized_nested(path, verify: bool = True) -> QuantizedNemotronH:
    """The elastic model of a quantized nested checkpoint: every budget from the one quantized copy
    (``model.budgets``); see :mod:`elastic_export.qmodel`."""
    from .hf_io import resolve_tying
    from .nested import MANIFEST, WEIGHTS, read_manifest, verify_files

    path = Path(path)
    manifest, cfg, budgets = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    entry = manifest.get("quantization")
    if not isinstance(entry, dict) or not isinstance(entry.get("plan"), dict):
        raise CheckpointError("has no quantization plan", path=path / MANIFEST, field="quantization")
    spec = _spec(entry, path / MANIFEST)
    sf = SafetensorsFile(path / WEIGHTS, writable=True)  # mapped: codes are read where a layer runs
    tensors = {k: sf.tensor(k) for k in sf.keys()}
    cfg = resolve_tying(cfg, [n for n in tensors if not n.endswith(SCALE)])
    qw = _qweights(tensors, entry["plan"], spec.format, path / WEIGHTS)
    model = quantized_model(cfg, tensors, qw, entry)
    # codes and scales are never written: a tensor's pages can go once it is packed (qmodel._kernel)
    model._drop_pages = lambda name: sf.drop_pages([name, name + SCALE])
    model.budgets = budgets
    model.source = path
    return model


# ---- slicing ---------------------------------------------------------------------------------------

def slice_model(qm: QuantizedNemotronH, subnet) -> QuantizedNemotronH:
    """The standalone quantized model of one budget: the elastic rule applied to codes and scales
    (quant.slice_quantized), no arithmetic on either; group-contiguous heads, kept layers only."""
    from .slicing import sliced_config

    entry = qm.quantization
    plan = entry["plan"]
    spec = _spec(entry, Path("elastic.json"))
    packed = spec.format == "int4"

    def finish(name, q, s, block):  # int4 packed as soon as it is sliced: the budget is held at its own bytes
        return QWeight(quant.pack_int4(q) if packed else q, s, block, packed)

    state, bplan = quant.slice_quantized(qm, _Unpacked(qm.qweights), plan, subnet, finish)
    qws = {n: state[n] for n in bplan}
    floats = {n: t for n, t in state.items() if n not in bplan}
    m = quantized_model(sliced_config(qm.config, subnet), floats, qws, {**entry, "plan": bplan})
    from .elastic import full_subnet

    m.budgets = {"full": full_subnet(m.config)}
    return m


class _Unpacked:
    """name -> (codes unpacked, scales) of quantized weights, one tensor at a time, when asked."""

    def __init__(self, qweights: dict[str, QWeight]):
        self.qweights = qweights

    def __getitem__(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        qw = self.qweights[name]
        return qweight_codes(qw), qw.scales


def _module(name: str) -> str:
    """HF module name of a Linear / Embedding weight: backbone.layers.3.mixer.in_proj.weight -> the
    target regex (the prefix is backbone. on disk, model. in transformers' memory)."""
    mod = name.removesuffix(".weight")
    if mod == "lm_head":
        return "re:^lm_head$"
    return "re:.*" + re.escape(mod.removeprefix("backbone.")) + "$"


def ct_quantization_config(spec: quant.QuantSpec, per_module: dict[str, int]) -> dict:
    """config.json ``quantization_config`` (compressed-tensors) for HF weight names -> block."""
    fmt = spec.fmt
    groups = {}
    for i, b in enumerate(sorted(set(per_module.values()), reverse=True)):
        groups[f"group_{i}"] = {
            "targets": [_module(n) for n, bb in per_module.items() if bb == b],
            "weights": {"num_bits": fmt.bits, "type": "float" if spec.format == "fp8" else "int", "symmetric": True,
                        "strategy": "group", "group_size": b, "dynamic": False, "actorder": None,
                        "block_structure": None, "observer": "minmax", "observer_kwargs": {}},
            "input_activations": None, "output_activations": None, "format": CT_FORMATS[spec.format]}
    return {"quant_method": "compressed-tensors", "format": CT_FORMATS[spec.format],
            "quantization_status": "compressed", "config_groups": groups, "ignore": [], "kv_cache_scheme": None,
            "global_compression_ratio": None,
            "elastic_export": {"method": spec.method, "block": spec.block_size,
                               "note": "blocks per tensor: the largest power of two <= block that every budget "
                                       "of the nested family keeps whole (elastic_export.quant.quant_plan)"}}


def _hf_tensors(qm: QuantizedNemotronH, uniform: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """(safetensors state in the compressed-tensors layout, HF weight name -> block). ``uniform``:
    every tensor at the smallest block (its scales repeated: the same weights exactly)."""
    from .hf_io import LM_HEAD, split_experts

    floats = {n: t.detach().contiguous() for n, t in qm.state_dict().items() if n not in qm.qweights}
    qws = dict(qm.qweights)
    if qm.lm_head is None:  # tied: transformers' NemotronH reads an explicit lm_head
        emb = "backbone.embeddings.weight"
        if emb in qws:
            qws[LM_HEAD] = qws[emb]
        else:
            floats[LM_HEAD] = floats[emb].clone()
    out, blocks = dict(split_experts(floats)), {}
    smallest = min((qw.block for qw in qws.values()), default=0)
    for name, qw in qws.items():
        codes = split_experts({name: qw.codes})  # int4: still packed, [N, K/2] bytes
        s = qw.scales.repeat_interleave(qw.block // smallest, -1) if uniform else qw.scales
        scales = split_experts({name: s})
        for (hf, q), s in zip(codes.items(), scales.values()):
            mod = hf.removesuffix(".weight")
            blocks[hf] = smallest if uniform else qw.block
            out[mod + ".weight_scale"] = s.contiguous()
            if qw.packed:  # our bytes are compressed-tensors' nibbles: int32 words of 8 codes, little-endian
                pad = (-q.shape[-1]) % 4
                p = torch.cat([q, q.new_zeros(*q.shape[:-1], pad)], -1) if pad else q.contiguous()
                out[mod + ".weight_packed"] = p.view(torch.int32)
                out[mod + ".weight_shape"] = torch.tensor([*q.shape[:-1], 2 * q.shape[-1]], dtype=torch.int64)
            else:
                out[mod + ".weight"] = q.contiguous()
    return out, blocks


def save_quantized_slice(qm: QuantizedNemotronH, path, tokenizer=None, uniform: bool = False) -> Path:
    """Write a standalone quantized model (:func:`slice_model`) as an HF checkpoint in the
    compressed-tensors layout (atomic). Each tensor keeps its block (one config group per block size:
    the layout expresses it, vLLM matches groups per module); ``uniform`` writes every tensor at the
    smallest block instead (scales repeated, weights unchanged), for readers that apply one scheme
    to every dense layer (transformers 5's compressed-tensors loader)."""
    from .hf_io import SINGLE, atomic_dir, dtype_name

    cfg = qm.config
    if cfg.padded_widths is not None:
        raise BudgetError("a padded quantized slice would pad inside quantization blocks", field="layout",
                          fix="write heterogeneous quantized budgets with --layout compact")
    spec = _spec(qm.quantization, Path("elastic.json"))
    tensors, blocks = _hf_tensors(qm, uniform)
    config = cfg.to_dict(dtype_name(qm.compute_dtype))
    config["quantization_config"] = ct_quantization_config(spec, blocks)
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_tensors(tmp / SINGLE, tensors, {"format": "pt"})  # no serialized copy of the tensors
        if tokenizer is not None:
            shutil.copytree(tokenizer, tmp / "tokenizer")
    return Path(path)


def load_quantized_slice(path) -> QuantizedNemotronH:
    """A quantized HF checkpoint in the compressed-tensors layout we write (a slice) as a
    :class:`QuantizedNemotronH` (one budget, "full")."""
    from .config import ModelConfig
    from .elastic import full_subnet
    from .hf_io import checkpoint_dir, merge_experts, resolve_tying, weight_files

    path = checkpoint_dir(path)
    raw = json.loads((path / "config.json").read_text())
    qc = raw.get("quantization_config") or {}
    fmt = {v: k for k, v in CT_FORMATS.items()}.get(qc.get("format"))
    if fmt is None:
        raise CheckpointError(f"quantization_config format {qc.get('format')!r} is not one elastic-export reads",
                              path=path / "config.json", field="quantization_config.format",
                              fix=f"use one of {', '.join(CT_FORMATS.values())} (symmetric, group strategy)")
    for g in (qc.get("config_groups") or {}).values():
        w = g.get("weights") or {}
        if not w.get("symmetric", True) or w.get("strategy") not in ("group", "channel"):
            raise CheckpointError("holds asymmetric or non-group quantization", path=path / "config.json",
                                  field="quantization_config.config_groups",
                                  fix="elastic-export reads the symmetric group layout it writes")
    cfg = ModelConfig.from_dict({k: v for k, v in raw.items() if k != "quantization_config"}, path=path / "config.json")
    tensors = {}
    for f in sorted(set(weight_files(path).values())):  # as stored (read_tensors would stack int8 experts)
        tensors.update(_read(f))
    tensors = {("backbone." + k[len("model."):] if k.startswith("model.") else k): v for k, v in tensors.items()}
    codes, scales = {}, {}
    for n in [n for n in tensors if n.endswith(".weight_scale")]:
        mod = n.removesuffix(".weight_scale")
        s = tensors.pop(n)
        if fmt == "int4":
            shape = tuple(int(x) for x in tensors.pop(mod + ".weight_shape").tolist())
            q = quant.unpack_int4(tensors.pop(mod + ".weight_packed").view(torch.uint8)[..., :shape[-1] // 2])
        else:
            q = tensors.pop(mod + ".weight")
        codes[mod + ".weight"], scales[mod + ".weight"] = q, s
    codes = merge_experts(codes, path, lambda ts, key: torch.stack(ts))
    scales = merge_experts(scales, path, lambda ts, key: torch.stack(ts))
    tensors = merge_experts(tensors, path, lambda ts, key: torch.stack(ts))  # float experts (not quantized)
    cfg = resolve_tying(cfg, list(tensors) + list(codes))
    packed = fmt == "int4"
    qws = {n: QWeight(quant.pack_int4(q) if packed else q, scales[n], q.shape[-1] // scales[n].shape[-1], packed)
           for n, q in codes.items()}
    spec_entry = {"format": fmt, "block": max([q.block for q in qws.values()], default=0) or 32,
                  "method": (qc.get("elastic_export") or {}).get("method", "rtn"),
                  "plan": {n: q.block for n, q in qws.items()}}
    m = quantized_model(cfg, tensors, qws, spec_entry)
    m.budgets = {"full": full_subnet(cfg)}
    m.source = path
    return m


def load_quantized(path, budget: str | None = None) -> QuantizedNemotronH:
    """``elastic_export.load`` of a quantized checkpoint (nested, or one of its slices)."""
    if is_quantized_hf(path):
        m = load_quantized_slice(path)
        if budget not in (None, "full"):
            raise BudgetError(f"unknown budget {budget!r}", path=path, field="budget", fix="use full")
        return m
    m = load_quantized_nested(path)
    if budget is None:
        return m
    if budget not in m.budgets:
        raise BudgetError(f"unknown budget {budget!r}", path=path, field="budget",
                          fix=f"use one of {', '.join(m.budgets)}")
    return slice_model(m, m.budgets[budget])


def slice_quantized_dir(src, budget: str, out, layout: str = "padded", uniform: bool = False,
                        dtype=None, echo=print) -> None:
    """``elastic-export slice`` on a quantized nested checkpoint: one compressed-tensors checkpoint per
    budget (``budget`` "all": a subdirectory each), written atomically."""
    from .hf_io import atomic_dir

    qm = load_quantized_nested(src)
    if dtype is not None:
        qm = qm.to(dtype)
    names = list(qm.budgets) if budget == "all" else [budget]
    for n in names:
        if n not in qm.budgets:
            raise BudgetError(f"unknown budget {n!r}", path=Path(src) / "elastic.json",
                              fix=f"use one of {', '.join(qm.budgets)}")
    tok = Path(src) / "tokenizer"
    with atomic_dir(out) as tmp:
        for n in names:
            sm = slice_model(qm, qm.budgets[n])
            if sm.config.layer_widths is not None and layout == "padded":
                echo(f"  note: {n} is heterogeneous; quantized slices are written compact (padding would cut "
                     "quantization blocks), which elastic_export.load reads and other tools do not")
            target = tmp / n if budget == "all" else tmp
            save_quantized_slice(sm, target, tok if tok.is_dir() else None, uniform)
            blocks = sorted({q.block for q in sm.qweights.values()})
            kind = "compact, per-layer widths (elastic_export.load only)" if sm.config.layer_widths is not None \
                else "HF nemotron_h, compressed-tensors"
            where = f"{out}/{n}" if budget == "all" else out
            groups = f"group {blocks[0]}" if uniform or len(blocks) == 1 else f"groups {', '.join(map(str, blocks))}"
            echo(f"{n}: {sm.num_parameters():,} parameters, {qm.quantization['format']} ({groups}), "
                 f"{sm.quantized_bytes() / 1e6:.2f} MB of codes + scales, {kind} -> {where}")
            if not uniform and len(blocks) > 1:
                echo(f"  note: {n} mixes block sizes {blocks} (one config group each); transformers' loader "
                     "applies one scheme to every dense layer: pass --uniform-groups for it")


def family_quant_plans(source, cfg, budgets: dict, formats: list[str]) -> dict[str, dict[str, int]]:
    """format -> the family's blocks for plan-memory: a quantized nested checkpoint's own plan for its
    format, else quant.quant_plan over ``budgets`` at the format's default block."""
    from .hf_io import expected_shapes

    out = {}
    own = None
    if source is not None and is_quantized_nested(source):
        own = json.loads((Path(source) / "elastic.json").read_text())["quantization"]
    for fmt in formats:
        if own is not None and own.get("format") == fmt:
            out[fmt] = dict(own["plan"])
        else:
            out[fmt] = quant.quant_plan(cfg, {n: s for n, s in budgets.items() if n != "full"},
                                        expected_shapes(cfg), quant.QuantSpec(fmt))
    return out
