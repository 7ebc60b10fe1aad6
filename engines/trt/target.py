"""`elastic-export build --target trt|auto`: TensorRT engines on top of the ONNX build.

``elastic_export.build.build`` writes the ONNX graphs and imports no runtime; this module adds the
TensorRT part through its ``engines=`` hook, inside the same temporary directory, so a failed
engine build leaves nothing behind. In order: :func:`engines.trt.require` (TensorRT and a CUDA GPU,
else a one-line error and nothing written); the SSM mode from :func:`engines.trt.ssm_op_for_trt`
(``plugin`` where tensorrt.plugin exists, else ``decomposed``, saying so); the ONNX graphs exported
computing at the build dtype (bf16: a strongly typed BF16 network, float32 where model.py computes
in float32); then the engines:

    {budget}.{prefill,decode}.engine   strongly typed engines, one optimization profile each
    trt_manifest.json                  engines, profiles, bytes per budget (builder.build_family)

The budgets are different graphs, so each has its own engines holding its own weights; build.json
states the GPU memory that costs per budget (``trt.budget_engine_bytes``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from elastic_export.errors import ConfigError

TARGETS = ("onnx", "trt", "auto")


def trt_availability() -> tuple[bool, str]:
    """(ok, why not): TensorRT and a CUDA GPU (without tensorrt.plugin the scan is built decomposed)."""
    from . import availability

    return availability(need_plugin=False)


def resolve_target(target: str) -> str:
    """onnx | trt | auto -> onnx or trt; trt needs TensorRT and a GPU, else a clear error."""
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


def default_timing_cache() -> Path:
    """Where TensorRT builds keep their timing cache, shared by every build on this machine
    (``ELASTIC_EXPORT_TRT_TIMING_CACHE``, else ``$XDG_CACHE_HOME/elastic-export/trt_timing.cache``)."""
    env = os.environ.get("ELASTIC_EXPORT_TRT_TIMING_CACHE")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "elastic-export" / "trt_timing.cache"


def build_trt(source, out, budgets=("all",), ssm_op: str | None = None, dtype: str = "fp32",
              opset: int | None = None, overwrite: bool = False, progress=None,
              timing_cache: str | Path | None = None) -> Path:
    """An ONNX build of ``source`` computing at ``dtype``, plus one TensorRT engine per budget and graph."""
    from elastic_export.build import build

    from . import require, ssm_op_for_trt

    require(need_plugin=False)  # TensorRT and a GPU, before anything is written
    ssm_op, note = ssm_op_for_trt(ssm_op)  # plugin, or decomposed where tensorrt.plugin is missing

    def engines(tmp: Path, info: dict, chosen: dict, progress) -> dict:
        return {"target": "trt", **_build_engines(info, chosen, tmp, timing_cache, progress)}

    return build(source, out, budgets=budgets, ssm_op=ssm_op, dtype=dtype, opset=opset, overwrite=overwrite,
                 progress=progress, target="trt", compute_dtype=dtype, note=note, engines=engines)


def _build_engines(info: dict, chosen: dict, tmp: Path, timing_cache, progress) -> dict:
    """TensorRT engines of every exported graph into ``tmp``; the build manifest's ``trt`` part."""
    from .builder import MANIFEST, build_family

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
    trt = {"manifest": MANIFEST, "timing_cache": str(cache),
           "engines": {b: {k: e["file"] for k, e in kinds.items()} for b, kinds in tm["budgets"].items()},
           "budget_engine_bytes": tm["budget_engine_bytes"], "total_engine_bytes": tm["total_engine_bytes"],
           "weights_note": tm["weights_note"], "tensorrt": next(
               (e.get("tensorrt") for kinds in tm["budgets"].values() for e in kinds.values()), None)}
    return {"trt": trt, "trt_manifest": MANIFEST, "files": files}
