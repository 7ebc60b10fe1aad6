"""`elastic-export validate`: load a family, run accuracy parity, memory parity and the device plan,
write the report. setup -> run -> save, as a recipe.

Sources: a nested checkpoint (elastic.json), a build directory (ONNX / TensorRT artefacts with the
nested weights they were built from), or a plain HF checkpoint (one budget, "full").
"""

from __future__ import annotations

import datetime
import platform
import tempfile
from pathlib import Path

import torch

from elastic_export.errors import CheckpointError, ConfigError

from .backends import Family, available, make_backend, reference
from .parity import make_eval_data, run_parity
from .thresholds import THRESHOLDS, thresholds as apply_overrides

ORT_MODES = ("standard", "decomposed")


def _tokenizer(path: Path | None, vocab_size: int):
    from elastic_export.tokenizer import ByteTokenizer, load_tokenizer

    if path is not None and path.exists():
        return load_tokenizer(path)
    tok = ByteTokenizer()
    if vocab_size < tok.vocab_size:
        raise ConfigError(f"the checkpoint has no tokenizer/ and its vocabulary ({vocab_size}) is smaller than the "
                          f"byte-level tokenizer's ({tok.vocab_size})", path=path,
                          fix="add the tokenizer to the checkpoint (tokenizer/tokenizer.json)")
    return tok


def load_family(path: str | Path) -> Family:
    """A Family from a nested checkpoint, a build directory or an HF checkpoint (float32 reference)."""
    from elastic_export.nested import is_nested, load_nested

    path = Path(path)
    if not path.exists():
        raise CheckpointError("does not exist", path=path, fix="give a nested checkpoint or a build directory")
    build = _build_manifest(path)
    if build is not None:
        return _family_from_build(path, build)
    if is_nested(path):
        ckpt = load_nested(path, dtype=torch.float32)
        fam = Family(ckpt.model, dict(ckpt.budgets), _tokenizer(ckpt.tokenizer_path, ckpt.config.vocab_size),
                     path=str(path))
        fam.engines.update(_engine_factories(fam, None))
        return fam
    if (path / "config.json").is_file():
        from elastic_export import full_subnet, load

        model = load(path, dtype=torch.float32)
        fam = Family(model, {"full": full_subnet(model.config)},
                     _tokenizer(path / "tokenizer", model.config.vocab_size), path=str(path))
        fam.engines.update(_engine_factories(fam, None))
        return fam
    raise CheckpointError("is neither a nested checkpoint (elastic.json), a build directory nor an HF checkpoint "
                          "(config.json)", path=path, fix="give the output of `elastic-export nest` or `build`")


# ---- build directories and engines (issue 5 / 6) ---------------------------------------------------

BUILD_MANIFESTS = ("build.json", "manifest.json")


def _build_manifest(path: Path) -> dict | None:
    import json

    for name in BUILD_MANIFESTS:
        f = path / name
        if path.is_dir() and f.is_file():
            try:
                return json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"is not valid JSON ({e})", path=f) from None
    return None


def _family_from_build(path: Path, manifest: dict) -> Family:
    """A build directory: the reference from its nested source, engines from its artefacts."""
    from elastic_export.nested import load_nested

    src = manifest.get("source") or manifest.get("nested")
    src = src.get("path") if isinstance(src, dict) else src
    nested = path / "nested" if (path / "nested" / "elastic.json").is_file() else (Path(src) if src else None)
    if nested is None or not (nested / "elastic.json").is_file():
        raise CheckpointError("the build does not say where its nested checkpoint is", path=path,
                              fix="validate the nested checkpoint and give the build with --build")
    ckpt = load_nested(nested, dtype=torch.float32)
    fam = Family(ckpt.model, dict(ckpt.budgets), _tokenizer(ckpt.tokenizer_path, ckpt.config.vocab_size),
                 path=str(nested), build=str(path))
    dtype = manifest.get("dtype", "fp32")
    from .thresholds import precision_name

    fam.precision = precision_name(dtype)
    fam.engines.update(_engine_factories(fam, path, manifest))
    return fam


def _engine_factories(fam: Family, build: Path | None, manifest: dict | None = None) -> dict:
    """Engine constructors available here: the torch engine, ONNX Runtime per SSM mode, TensorRT."""
    out = {}
    try:
        from engines.torch_engine import TorchEngine

        out["torch-engine"] = lambda: TorchEngine(fam.model, fam.budgets)
    except ImportError:
        pass
    try:
        import onnxruntime  # noqa: F401
        from engines.ort_engine import OrtEngine
    except ImportError:
        OrtEngine = None
    if OrtEngine is not None:
        if build is not None and (manifest or {}).get("target", "onnx") == "onnx":
            mode = (manifest or {}).get("ssm_op", "standard")
            out[f"ort-{mode}"] = lambda: OrtEngine(build)
        elif build is None:
            for mode in ORT_MODES:
                out[f"ort-{mode}"] = (lambda m=mode: _ort_from_export(fam, m, OrtEngine))
    if build is not None and (manifest or {}).get("target") == "trt":
        try:
            from engines.trt.engine import TrtEngine

            out["trt"] = lambda: TrtEngine(build)
        except ImportError:
            pass
    return out


def _ort_from_export(fam: Family, mode: str, OrtEngine):
    """Build the family's ONNX graphs for one SSM mode into a temporary directory and open them."""
    from elastic_export.build import build

    if fam.path is None:
        raise ConfigError("an ONNX Runtime backend needs the family on disk (a nested checkpoint)", field="source")
    tmp = tempfile.TemporaryDirectory(prefix=f"ee-validate-{mode}-")
    out = build(fam.path, Path(tmp.name) / "build", ssm_op=mode, dtype="fp32" if fam.precision == "fp32" else "bf16")
    engine = OrtEngine(out)
    engine._validation_tmp = tmp  # the directory lives as long as the engine
    return engine


# ---- the recipe ------------------------------------------------------------------------------------

def validate(family: Family, report_dir: str | Path | None = None, backends: list[str] | None = None,
             device: str | None = None, context: int = 8192, batch: int = 1,
             overrides: dict[str, dict[str, float]] | None = None, measure_memory: bool = True,
             budgets: list[str] | None = None, progress: bool = True, eval_kwargs: dict | None = None,
             memory_isolation: str | None = None) -> dict:
    """Run every check and (with ``report_dir``) write the report. Returns the report dict; its
    ``passed`` is False when any backend fails a threshold."""
    from elastic_export import __version__
    from elastic_export.accounting import count_params

    from . import memory as memory_lib
    from . import planner
    from .report import write_report

    limits = apply_overrides(overrides)
    here = available(family)
    for b in backends or ():
        if not _known_name(b):
            raise ConfigError(f"unknown backend {b!r}", field="--backends",
                              fix="use torch, sliced, torch-engine, ort-standard, ort-decomposed or trt")
        if b not in here:
            raise ConfigError(f"backend {b!r} is not available here (or for this source)", field="--backends",
                              fix=f"use some of {', '.join(here)}")
    wanted = list(backends or here)
    skipped = {b: "not available on this machine or for this source" for b in ALL_BACKENDS if b not in here}
    names = [b for b in wanted if b in here]
    budget_names = budgets or list(family.budgets)
    for b in budget_names:
        if b not in family.budgets:
            raise ConfigError(f"unknown budget {b!r}", field="--budget", fix=f"use one of {list(family.budgets)}")
    cfg = family.model.config
    data = make_eval_data(family.tokenizer, cfg.vocab_size, **(eval_kwargs or {}))
    built, broken = [], []
    for n in names:
        try:
            built.append(make_backend(n, family))
        except Exception as e:  # an artefact that does not even load fails validation, it does not crash it
            msg = f"could not load: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            broken += [{"backend": n, "budget": b, "precision": family.precision, "metrics": {}, "failed": [msg],
                        "passed": False} for b in budget_names]
    try:
        parity = run_parity(reference(family), built, data, limits, budget_names, progress=progress)
    finally:
        for be in built:
            be.close()
    parity["rows"] += broken

    mem = None
    if measure_memory:
        dtype = torch.float32 if family.precision == "fp32" else torch.bfloat16
        mem = memory_lib.memory_parity(family.model, {b: family.budgets[b] for b in budget_names}, dtype,
                                       nested_dir=family.build or family.path, measure=True,
                                       isolation=memory_isolation)
    plan_dtype = "float32" if family.precision == "fp32" else "bfloat16"
    plan = planner.plan(cfg, {b: family.budgets[b] for b in budget_names}, [device] if device else
                        list(planner.PROFILES), context, batch, dtypes=(plan_dtype,))

    failures = [f"{r['backend']} / {r['budget']}: {'; '.join(r['failed'])}" for r in parity["rows"] if not r["passed"]]
    report = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tool_version": __version__,
        "machine": _machine(),
        "source": {"path": family.path, "build": family.build, "kind": "build" if family.build else "nested",
                   "precision": family.precision,
                   "budgets": {b: {"params": count_params(cfg, family.budgets[b]),
                                   "subnet": family.budgets[b].to_dict()} for b in budget_names}},
        "eval": {"rows": list(data.rows.shape), "decode_steps": data.decode_steps, "n_tasks": len(data.tasks),
                 "task_source": data.task_source, "greedy_tokens": data.greedy_tokens},
        "thresholds": {p: limits[p] for p in THRESHOLDS},
        "backends": [be.name for be in built] + list(dict.fromkeys(r["backend"] for r in broken)),
        "skipped_backends": skipped,
        "reference": parity["reference"],
        "parity": parity["rows"],
        "memory": mem,
        "plan": plan,
        "passed": not failures,
        "failures": failures,
    }
    if report_dir is not None:
        write_report(report, report_dir)
    return report


ALL_BACKENDS = ("torch", "sliced", "torch-engine", *(f"ort-{m}" for m in ORT_MODES), "trt")


def _known_name(name: str) -> bool:
    return name in ALL_BACKENDS or name.startswith("ort-")


def _machine() -> dict:
    out = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.cuda.is_available(), "cpu_threads": torch.get_num_threads()}
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return out
