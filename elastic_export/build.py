"""`elastic-export build`: a nested checkpoint -> a self-describing build directory.

Layout of an ONNX build (every budget reads the one weight file; nothing else holds weights):
    build.json                  manifest: format, target, ssm_op, opset, dtype, config, budgets
                                (subnet, graphs, states), files (bytes, sha256), weight layout
    weights.bin                 the nested weights once, at the build dtype
    {budget}.prefill.onnx       input_ids, attention_mask -> logits, present states
    {budget}.decode.onnx        one token, attention_mask, past states -> logits, present states
    tokenizer/                  copied from the nested checkpoint when it has one

The directory is written to a temporary sibling and renamed into place, so a failure leaves nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .elastic import Subnet
from .errors import BudgetError, CheckpointError, ConfigError
from .hf_io import atomic_dir, dtype_name, parse_dtype

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
    """onnx | trt | auto -> onnx or trt; trt needs engines.trt and a GPU, else a clear error."""
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
    res = trt.availability()
    if isinstance(res, tuple):
        return bool(res[0]), str(res[1])
    return bool(res), "" if res else "tensorrt or a CUDA GPU is missing"


def build(nested: str | Path | None, out: str | Path, budgets=("all",), target: str = "onnx",
          ssm_op: str = "standard", dtype: str = "fp32", opset: int | None = None,
          overwrite: bool = False, progress=None) -> Path:
    """Build ``out`` from a nested checkpoint (None: the shipped default model). Returns ``out``."""
    from .onnx_export import check_opset, export_family

    out = Path(out)
    torch_dtype = parse_dtype(dtype)
    if torch_dtype not in (torch.float32, torch.bfloat16):
        raise ConfigError(f"unsupported build dtype {dtype!r}", field="dtype", fix="use fp32 or bf16")
    opset = check_opset(ssm_op, opset)  # validate every option before touching the disk
    if out.exists() and not overwrite:
        raise CheckpointError("already exists", path=out, fix="choose another --out or pass --overwrite")
    real_target = resolve_target(target)
    model, family, src = load_family(nested)
    chosen = select_budgets(family, list(budgets))
    if real_target == "trt":
        from engines import trt

        with atomic_dir(out) as tmp:
            trt.build(model, chosen, tmp, ssm_op=ssm_op, dtype=torch_dtype, opset=opset, source=src)
        return out
    with atomic_dir(out) as tmp:
        if progress:
            progress(f"exporting {len(chosen)} budget(s) to ONNX ({ssm_op}, opset {opset}, {dtype_name(torch_dtype)})")
        info = export_family(model, chosen, tmp, ssm_op=ssm_op, dtype=torch_dtype, opset=opset)
        tok = src / "tokenizer"
        if tok.is_dir():
            shutil.copytree(tok, tmp / "tokenizer")
        manifest = {
            "format": BUILD_FORMAT, "version": BUILD_VERSION, "target": "onnx", "ssm_op": ssm_op,
            "opset": info["opset"], "dtype": dtype_name(torch_dtype), "source": str(src),
            "config": model.config.to_dict(),
            "budgets": {n: {"subnet": s.to_dict(), "graphs": info["graphs"][n], "states": info["states"][n]}
                        for n, s in chosen.items()},
            "weights": {"file": "weights.bin", "bytes": info["files"]["weights.bin"]["bytes"]},
            "files": info["files"],
            "tokenizer": "tokenizer" if tok.is_dir() else None,
        }
        (tmp / "build.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


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
    import hashlib

    path = Path(path)
    for fname, rec in read_build(path)["files"].items():
        f = path / fname
        if not f.is_file():
            raise CheckpointError("is missing", path=f, fix="rebuild with elastic-export build")
        sha = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                sha.update(chunk)
        if sha.hexdigest() != rec["sha256"]:
            raise CheckpointError("fails its SHA-256 check", path=f, fix="the file changed; rebuild")
