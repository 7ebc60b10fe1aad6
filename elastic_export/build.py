"""`elastic-export build`: a nested checkpoint -> a self-describing build directory.

Layout of an ONNX build (every budget reads the one weight file; nothing else holds weights):
    build.json                  manifest: format, target, ssm_op, opset, dtype, config, budgets
                                (subnet, graphs, states), files (bytes, sha256), weight layout
    weights.bin                 the nested weights once, at the build dtype
    {budget}.prefill.onnx       input_ids, attention_mask -> logits, present states
    {budget}.decode.onnx        one token, attention_mask, past states -> logits, present states
    tokenizer/                  copied from the nested checkpoint when it has one

The directory is written to a temporary sibling and renamed into place, so a failure leaves nothing.

``--target trt`` adds TensorRT engines built from those graphs by ``engines.trt``:
    {budget}.{prefill,decode}.engine   strongly typed engines, one optimization profile each
    trt_manifest.json                  engines, profiles, bytes per budget (engines.trt.builder)
In order: ``engines.trt.require()`` (TensorRT and a CUDA GPU, else a one-line error and nothing
written); the SSM mode from ``engines.trt.ssm_op_for_trt`` (``plugin`` where tensorrt.plugin exists,
else ``decomposed``, saying so); the ONNX graphs exported with compute at the build dtype (bf16: a
strongly typed BF16 network, float32 where model.py computes in float32); then the engines. The
budgets are different graphs, so each has its own engines holding its own weights; build.json
states the GPU memory that costs per budget (``trt.budget_engine_bytes``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .elastic import Subnet
from .errors import BudgetError, CheckpointError, ConfigError
from .hf_io import atomic_dir, dtype_name, parse_dtype
from .nested import sha256_file

BUILD_FORMAT = "elastic-export-build"
BUILD_VERSION = 1
TARGETS = ("onnx", "trt", "auto")


def default_model_path() -> Path:
    """The nested checkpoint shipped with the package (elastic_export/default_model/)."""
    return Path(__file__).parent / "default_model"


def load_family(path: str | Path | None):
    """(model, budgets name -> Subnet largest first, checkpoint dir) of a nested checkpoint.

    The one place that reads nested checkpoints for building and serving (elastic_export.nested)."""
    path = Path(path) if path is not None else default_model_path()
    if not path.exists():
        hint = "the shipped default model is not installed; give a NESTED checkpoint path" \
            if path == default_model_path() else "give the path of a nested checkpoint"
        raise CheckpointError("does not exist", path=path, fix=hint)
    from .nested import load_nested  # verifies the manifest and every file's SHA-256

    nested = load_nested(path)
    return nested.model, dict(nested.budgets), Path(nested.path)


def select_budgets(budgets: dict[str, Subnet], names: list[str] | tuple[str, ...]) -> dict[str, Subnet]:
    if not names or list(names) == ["all"]:
        return dict(budgets)
    unknown = [n for n in names if n not in budgets]
    if unknown:
        raise BudgetError(f"unknown budget {unknown[0]!r}", field="budget",
                          fix=f"use 'all' or one of {', '.join(budgets)}")
    return {n: budgets[n] for n in budgets if n in names}  # keep the checkpoint's order (largest first)


def resolve_target(target: str) -> str:
    """onnx | trt | auto -> onnx or trt; trt needs engines.trt, TensorRT and a GPU, else a clear error."""
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}", field="target", fix=f"use one of {TARGETS}")
    if target == "onnx":
        return "onnx"
    ok, why = trt_availability()
    if target == "auto":
        return "trt" if ok else "onnx"
    if not ok:
        raise ConfigError(f"TensorRT target is unavailable: {why}", field="target",
                          fix="use --target onnx (or auto) on this machine")
    return "trt"


def trt_availability() -> tuple[bool, str]:
    try:
        from engines import trt
    except ImportError as e:
        return False, f"engines.trt is not installed ({e.name or e})"
    if not hasattr(trt, "availability"):
        return False, "engines.trt has no availability() check"
    res = trt.availability(need_plugin=False)  # without tensorrt.plugin the scan is built decomposed
    if isinstance(res, tuple):
        return bool(res[0]), str(res[1])
    return bool(res), "" if res else "tensorrt or a CUDA GPU is missing"


def default_timing_cache() -> Path:
    """Where TensorRT builds keep their timing cache, shared by every build on this machine
    (``ELASTIC_EXPORT_TRT_TIMING_CACHE``, else ``$XDG_CACHE_HOME/elastic-export/trt_timing.cache``)."""
    env = os.environ.get("ELASTIC_EXPORT_TRT_TIMING_CACHE")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "elastic-export" / "trt_timing.cache"


def default_ssm_op(target: str) -> tuple[str, str | None]:
    """The SSM mode when none is asked for: ``standard`` for ONNX Runtime; for TensorRT ``plugin``
    where tensorrt.plugin exists, else ``decomposed`` (with a note saying why)."""
    if target != "trt":
        return "standard", None
    from engines import trt

    return trt.ssm_op_for_trt(None)


def build(nested: str | Path | None, out: str | Path, budgets=("all",), target: str = "auto",
          ssm_op: str | None = None, dtype: str = "fp32", opset: int | None = None,
          overwrite: bool = False, progress=None, timing_cache: str | Path | None = None) -> Path:
    """Build ``out`` from a nested checkpoint (None: the shipped default model). Returns ``out``.

    ``target`` trt exports the ONNX graphs computing at ``dtype`` (bf16: the strongly typed BF16
    network), then builds one TensorRT engine per budget and graph next to them
    (engines.trt.builder.build_family, its manifest trt_manifest.json), reusing ``timing_cache``
    (default: :func:`default_timing_cache`)."""
    from .onnx_export import check_opset, export_family

    out = Path(out)
    torch_dtype = parse_dtype(dtype)
    if torch_dtype not in (torch.float32, torch.bfloat16):
        raise ConfigError(f"unsupported build dtype {dtype!r}", field="dtype", fix="use fp32 or bf16")
    real_target = resolve_target(target)
    note = None
    if real_target == "trt":
        from engines import trt as etrt

        etrt.require(need_plugin=False)  # TensorRT and a GPU, before anything is written
        ssm_op, note = etrt.ssm_op_for_trt(ssm_op)  # plugin, or decomposed where tensorrt.plugin is missing
    elif ssm_op is None:
        ssm_op, note = default_ssm_op(real_target)
    opset = check_opset(ssm_op, opset)  # validate every option before touching the disk
    if out.exists() and not overwrite:
        raise CheckpointError("already exists", path=out, fix="choose another --out or pass --overwrite")
    model, family, src = load_family(nested)
    chosen = select_budgets(family, list(budgets))
    with atomic_dir(out) as tmp:
        if progress:
            if note:
                progress(note)
            progress(f"exporting {len(chosen)} budget(s) to ONNX ({ssm_op}, opset {opset}, {dtype_name(torch_dtype)})")
        # ONNX Runtime on CPU computes in float32; TensorRT runs the graph's own types (strongly typed)
        compute = torch_dtype if real_target == "trt" else torch.float32
        info = export_family(model, chosen, tmp, ssm_op=ssm_op, dtype=torch_dtype, opset=opset,
                             compute_dtype=compute)
        tok = src / "tokenizer"
        if tok.is_dir():
            shutil.copytree(tok, tmp / "tokenizer")
        manifest = {
            "format": BUILD_FORMAT, "version": BUILD_VERSION, "target": real_target, "ssm_op": ssm_op,
            "opset": info["opset"], "dtype": dtype_name(torch_dtype), "compute_dtype": info["compute_dtype"],
            "source": str(src),
            "config": model.config.to_dict(),
            "budgets": {n: {"subnet": s.to_dict(), "graphs": info["graphs"][n], "states": info["states"][n]}
                        for n, s in chosen.items()},
            "weights": {"file": "weights.bin", "bytes": info["files"]["weights.bin"]["bytes"]},
            "files": info["files"],
            "tokenizer": "tokenizer" if tok.is_dir() else None,
        }
        if note:
            manifest["ssm_op_note"] = note
        if real_target == "trt":
            manifest["trt"] = _build_engines(info, chosen, tmp, timing_cache, progress)
            manifest["trt_manifest"] = manifest["trt"]["manifest"]
            manifest["files"].update(manifest["trt"].pop("files"))
        (tmp / "build.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _build_engines(info: dict, chosen: dict, tmp: Path, timing_cache, progress) -> dict:
    """TensorRT engines of every exported graph into ``tmp``; the build manifest's ``trt`` part."""
    import hashlib

    from engines.trt.builder import MANIFEST, build_family

    cache = Path(timing_cache) if timing_cache else default_timing_cache()
    cache.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        progress(f"building TensorRT engines for {len(chosen)} budget(s) (timing cache {cache})")
    graphs = {n: {kind: tmp / f for kind, f in info["graphs"][n].items()} for n in chosen}
    tm = build_family(graphs, tmp, timing_cache=cache)
    files = {e["file"]: {"sha256": e["sha256"], "bytes": e["bytes"]}
             for kinds in tm["budgets"].values() for e in kinds.values()}
    data = (tmp / MANIFEST).read_bytes()
    files[MANIFEST] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    return {"manifest": MANIFEST, "timing_cache": str(cache),
            "engines": {b: {k: e["file"] for k, e in kinds.items()} for b, kinds in tm["budgets"].items()},
            "budget_engine_bytes": tm["budget_engine_bytes"], "total_engine_bytes": tm["total_engine_bytes"],
            "weights_note": tm["weights_note"], "tensorrt": next(
                (e.get("tensorrt") for kinds in tm["budgets"].values() for e in kinds.values()), None),
            "files": files}


def read_build(path: str | Path) -> dict:
    path = Path(path)
    mf = path / "build.json"
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"is not a readable build manifest ({e})", path=mf) from None
    if manifest.get("format") != BUILD_FORMAT:
        raise CheckpointError("is not an elastic-export build manifest", path=mf, field="format")
    return manifest


def verify_build(path: str | Path) -> None:
    """Refuse a build directory whose files do not match their recorded SHA-256."""

    path = Path(path)
    for fname, rec in read_build(path)["files"].items():
        f = path / fname
        if not f.is_file():
            raise CheckpointError("is missing", path=f, fix="rebuild with elastic-export build")
        if sha256_file(f) != rec["sha256"]:
            raise CheckpointError("fails its SHA-256 check", path=f, fix="the file changed; rebuild")
