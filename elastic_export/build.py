"""`elastic-export build`: any checkpoint we read -> a self-describing build directory.

The source is a nested checkpoint (every budget of its manifest), a plain HF ``nemotron_h``
checkpoint or one of our slices (a one-budget family, its budget named ``full``): whatever
:func:`elastic_export.loading.load_family` opens.

Layout of an ONNX build (every budget reads the one weight file; nothing else holds weights):
    build.json                  manifest: format, target, ssm_op, opset, dtype (stored), compute_dtype,
                                source_dtype, config, budgets
                                (subnet, graphs, states), files (bytes, sha256), weight layout,
                                source (absolute path, kind, its weight files' sha256 and bytes)
    weights.bin                 the source weights once, at the build (storage) dtype: the source's own
                                dtype unless asked otherwise (a bf16 checkpoint builds a bf16 file)
    {budget}.prefill.onnx       input_ids, attention_mask -> logits, present states
    {budget}.decode.onnx        one token, attention_mask, past states -> logits, present states
    tokenizer/                  copied from the source checkpoint when it has one

The directory is written to a temporary sibling and renamed into place, so a failure leaves nothing.

This module builds the ONNX part and imports no runtime. TensorRT engines are added by
``engines.trt.target.build_trt``, which calls :func:`build` with ``engines=``: a callable run
inside the temporary directory after the export, whose result joins the manifest. The command
line (elastic_export/cli.py) chooses between the two for ``--target``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .elastic import Subnet
from .errors import BudgetError, CheckpointError, ConfigError
from .hf_io import atomic_dir, dtype_name, parse_dtype
from .loading import load_family as _open_family
from .nested import sha256_file

BUILD_FORMAT = "elastic-export-build"
BUILD_VERSION = 1


def default_model_path() -> Path:
    """The nested checkpoint shipped with the package (elastic_export/default_model/)."""
    return Path(__file__).parent / "default_model"


def load_family(path: str | Path | None, dtype=None, writable: bool = True):
    """(model, budgets name -> Subnet largest first, checkpoint dir) of a nested or an HF checkpoint
    (None: the shipped default model); see :func:`elastic_export.loading.load_family`."""
    path = Path(path) if path is not None else default_model_path()
    if not path.exists():
        hint = "the shipped default model is not installed; give a checkpoint path" \
            if path == default_model_path() else "give the path of a nested or an HF checkpoint"
        raise CheckpointError("does not exist", path=path, fix=hint)
    return _open_family(path, dtype=dtype, writable=writable)


def select_budgets(budgets: dict[str, Subnet], names: list[str] | tuple[str, ...]) -> dict[str, Subnet]:
    if not names or list(names) == ["all"]:
        return dict(budgets)
    unknown = [n for n in names if n not in budgets]
    if unknown:
        raise BudgetError(f"unknown budget {unknown[0]!r}", field="budget",
                          fix=f"use 'all' or one of {', '.join(budgets)}")
    return {n: budgets[n] for n in budgets if n in names}  # keep the checkpoint's order (largest first)


# ---- the source a build was made from ---------------------------------------------------------

def source_record(src: Path) -> dict:
    """What build.json keeps of its source: the resolved path, its kind and the SHA-256 and bytes of
    its weight files (a nested checkpoint's from its verified manifest, an HF one's hashed here)."""
    src = Path(src).resolve()
    if (src / "elastic.json").is_file():
        from .nested import read_manifest

        files = {n: {"sha256": r["sha256"], "bytes": r["bytes"]} for n, r in read_manifest(src)[0]["files"].items()}
        return {"path": str(src), "kind": "nested", "files": files}
    names = sorted(p.name for p in src.glob("*.safetensors")) + ["config.json"]
    names += [n for n in ("model.safetensors.index.json",) if (src / n).is_file()]
    files = {n: {"sha256": sha256_file(src / n), "bytes": (src / n).stat().st_size} for n in names}
    return {"path": str(src), "kind": "hf", "files": files}


def build_source(path: str | Path, manifest: dict | None = None) -> Path:
    """The checkpoint a build directory was made from, checked against the checksums build.json
    recorded; a CheckpointError saying so when it is gone, moved or changed."""
    path = Path(path)
    manifest = manifest or read_build(path)
    mf = path / "build.json"
    rec = manifest.get("source")
    if isinstance(rec, str):  # builds written before sources were recorded: a path, maybe relative
        rec = {"path": rec, "files": {}}
    if not isinstance(rec, dict) or not rec.get("path"):
        raise CheckpointError("records no source checkpoint", path=mf, field="source",
                              fix="rebuild with this version of elastic-export build")
    src = Path(rec["path"])
    if not src.is_dir():
        raise CheckpointError(f"was built from {str(src)!r}, which no longer exists", path=path, field="source",
                              fix="put the source checkpoint back there, or rebuild from where it is now")
    if rec.get("kind") == "nested" and (src / "elastic.json").is_file():
        # the manifest's checksums, which load_nested then verifies every file against: no second hash
        now = source_record(src)["files"]
    else:
        now = {n: {"sha256": sha256_file(src / n), "bytes": (src / n).stat().st_size}
               for n in rec.get("files", {}) if (src / n).is_file()}
    for name, want in rec.get("files", {}).items():
        if now.get(name) != want:
            raise CheckpointError(f"was built from {str(src)!r}, whose {name} has changed (or is missing) since",
                                  path=path, field="source",
                                  fix="rebuild from the checkpoint as it is now, or restore the original")
    return src


# ---- build ------------------------------------------------------------------------------------

def build(source: str | Path | None, out: str | Path, budgets=("all",), ssm_op: str | None = None,
          dtype: str | torch.dtype | None = None, opset: int | None = None, overwrite: bool = False, progress=None,
          target: str = "onnx", compute_dtype: str | torch.dtype | None = None, note: str | None = None,
          engines=None, quant: str | None = None, quant_block: int | None = None, quant_accuracy: int = 4) -> Path:
    """Build ``out`` from a nested or an HF checkpoint (None: the shipped default model). Returns ``out``.

    Storage and compute dtypes are separate. ``dtype``, the weight file's, follows the source as stored
    (bf16 stays bf16, fp32 stays fp32; an fp16 source is stored fp32) unless given. ``compute_dtype``
    is the graphs' arithmetic: float32 for an ONNX build (ONNX Runtime on a CPU has no bf16 kernels:
    each bf16 weight is read through a Cast, which engines.ort_engine upcasts once for all sessions),
    the storage dtype for a TensorRT one (``target="trt"``). ``engines(tmp, info, chosen, progress) ->
    dict``, when given (a runtime's builder, e.g. engines.trt.target), runs inside the temporary
    directory after the export; its dict's ``files`` join the manifest's checksums and every other key
    joins the manifest, ``target`` included. ``note`` (why an SSM mode was chosen) is printed and recorded.

    ``ssm_op`` (default): ``standard``, or ``decomposed`` for a quantized build (with ``quant``, or from a
    quantized checkpoint): its decode is 1.3-1.5x the standard form's on a CPU (docs/quantization.md).

    ``quant`` (int8 | int4 | fp8): weight-only quantized graphs (elastic_export.onnx_quant), column
    blocks of ``quant_block`` (default: the format's) where every budget keeps them whole; the tensors
    that stay in float are stored at float32 whatever ``dtype`` says. ``quant_accuracy``: MatMulNBits'
    accuracy_level (4: int8 activations, ONNX Runtime's fast path; 0: float32 arithmetic).

    Memory: the source's weights once (as loaded), plus one block of a tensor being converted or
    transposed while weights.bin is written (onnx_graph.WeightFile.write)."""
    from .onnx_export import check_opset, export_family

    out = Path(out)
    if target != "onnx" and engines is None:
        raise ConfigError(f"target {target!r} needs a runtime's engine builder", field="target",
                          fix="build TensorRT engines with `elastic-export build --target trt` "
                              "(engines.trt.target.build_trt); this function builds ONNX")
    for name, value in (("dtype", dtype), ("compute_dtype", compute_dtype)):
        if parse_dtype(value) not in (None, torch.float32, torch.bfloat16):
            raise ConfigError(f"unsupported build {name} {value!r}", field=name, fix="use fp32 or bf16")
    from . import onnx_quant
    from .qcheckpoint import is_quantized_nested
    from .quant import QuantSpec

    if ssm_op is None:  # quantized builds are for CPU speed, where the decomposed form is the faster one
        quantized = quant is not None or (source is not None and is_quantized_nested(source))
        ssm_op = "decomposed" if quantized else "standard"

    spec = None if quant is None else QuantSpec(quant, block=quant_block)
    onnx_quant.check_accuracy(quant_accuracy)
    check_opset(ssm_op, opset)  # validate every option before touching the disk
    if out.exists() and not overwrite:
        raise CheckpointError("already exists", path=out, fix="choose another --out or pass --overwrite")
    model, family, src = load_family(source, writable=False)  # read only: its pages go back as written
    source_dtype = model.dtype
    torch_dtype = parse_dtype(dtype) or (source_dtype if source_dtype == torch.bfloat16 else torch.float32)
    compute = parse_dtype(compute_dtype) or (torch_dtype if target == "trt" else torch.float32)
    from_source = onnx_quant.source_quant(model)  # a quantized nested checkpoint: its codes as they are
    if from_source is not None:
        if spec is not None and (spec.format, spec.block_size) != (from_source[0].format, from_source[0].block_size):
            raise ConfigError(f"the checkpoint is quantized to {from_source[0].format} (block "
                              f"{from_source[0].block_size}), not {spec.format} (block {spec.block_size})",
                              path=src, field="quant", fix="drop --quant / --quant-block to build it as it is")
        spec = from_source[0]
    if spec is not None:
        if engines is not None:
            raise ConfigError("quantized builds are ONNX graphs for ONNX Runtime (and TensorRT's Q/DQ parser)",
                              field="quant", fix="build with --target onnx --quant ...")
        torch_dtype = compute = torch.float32
        opset = onnx_quant.check_opset(max(21, check_opset(ssm_op, None)) if opset is None else opset, spec.format)
    opset = check_opset(ssm_op, opset)
    chosen = select_budgets(family, list(budgets))
    source_rec = source_record(src)
    with atomic_dir(out) as tmp:
        if progress:
            if note:
                progress(note)
            progress(f"exporting {len(chosen)} budget(s) to ONNX ({ssm_op}, opset {opset}, "
                     f"{dtype_name(torch_dtype)} weights, {dtype_name(compute)} compute)")
        weights = None
        if spec is not None:  # the plan of the whole family, so that every build of it has the same codes
            qstate, plan = from_source[1:] if from_source is not None else (None, None)
            weights = onnx_quant.quant_weights(model, family, spec, quant_accuracy, qstate=qstate, plan=plan)
            if progress:
                how = "read" if from_source is not None else "quantized"
                progress(f"{how} {len(weights.lowering)} tensors, {spec.format} "
                         f"({', '.join(sorted(set(weights.lowering.values())))})")
        info = export_family(model, chosen, tmp, ssm_op=ssm_op, dtype=torch_dtype, opset=opset,
                             compute_dtype=compute, weights=weights)
        tok = src / "tokenizer"
        if tok.is_dir():
            shutil.copytree(tok, tmp / "tokenizer")
        manifest = {
            "format": BUILD_FORMAT, "version": BUILD_VERSION, "target": "onnx", "ssm_op": ssm_op,
            "opset": info["opset"], "dtype": dtype_name(torch_dtype), "compute_dtype": info["compute_dtype"],
            "source_dtype": dtype_name(source_dtype), "source": source_rec,
            "config": model.config.to_dict(),
            "budgets": {n: {"subnet": s.to_dict(), "graphs": info["graphs"][n], "states": info["states"][n]}
                        for n, s in chosen.items()},
            "weights": {"file": "weights.bin", "bytes": info["files"]["weights.bin"]["bytes"]},
            "files": info["files"],
            "tokenizer": "tokenizer" if tok.is_dir() else None,
        }
        if weights is not None:
            manifest["quant"] = weights.record()
        if note:
            manifest["ssm_op_note"] = note
        if engines is not None:
            extra = dict(engines(tmp, info, chosen, progress))
            manifest["files"].update(extra.pop("files", {}))
            manifest.update(extra)
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

    path = Path(path)
    for fname, rec in read_build(path)["files"].items():
        f = path / fname
        if not f.is_file():
            raise CheckpointError("is missing", path=f, fix="rebuild with elastic-export build")
        if sha256_file(f) != rec["sha256"]:
            raise CheckpointError("fails its SHA-256 check", path=f, fix="the file changed; rebuild")
