"""`elastic-export validate`: load a family, run accuracy parity, memory parity and the device plan,
write the report. setup -> run -> save, as a recipe.

Sources: a nested checkpoint (elastic.json), a build directory (ONNX / TensorRT artefacts with the
nested weights they were built from), or a plain HF checkpoint (one budget, "full").
"""

from __future__ import annotations

import datetime
import platform
import sys
import tempfile
from pathlib import Path

import torch

from elastic_export.errors import CheckpointError, ConfigError

from .backends import TWIN, Family, Lazy, Sliced, available, make_backend, reference, release_memory
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


def load_family(path: str | Path | None, builds: list[str | Path] = ()) -> Family:
    """A Family (the weights as stored, budgets, tokenizer, engines) from a nested checkpoint, a build
    directory (its source nested checkpoint is the reference) or an HF checkpoint (one budget); None:
    the shipped default model. The weights are loaded once, at their stored dtype (a bf16 checkpoint
    is not copied to float32: the float32 reference upcasts a layer at a time, backends.forward_f32).

    ``builds``: further build directories (ONNX or TensorRT) whose engines join the comparison.
    """
    from elastic_export.nested import is_nested, load_nested

    if path is None:
        from elastic_export.build import default_model_path

        path = default_model_path()
        if not (path / "elastic.json").is_file():
            raise CheckpointError("the shipped default model is not installed", path=path,
                                  fix="give a nested checkpoint or a build directory")
    path = Path(path)
    if not path.exists():
        raise CheckpointError("does not exist", path=path, fix="give a nested checkpoint or a build directory")
    from elastic_export.qcheckpoint import is_quantized_nested

    if is_quantized_nested(path):
        raise CheckpointError("is a quantized nested checkpoint: it holds no float weights to be the reference",
                              path=path / "elastic.json", field="quantization",
                              fix=f"give the float nested checkpoint it was quantized from, with --build {path}")
    manifest = read_build_manifest(path)
    if manifest is not None:
        from elastic_export.build import build_source

        src = build_source(path, manifest)
        from elastic_export.qcheckpoint import is_quantized_nested

        if is_quantized_nested(src):  # its codes are the build's; the float32 reference is its float parent
            raise CheckpointError(f"was built from the quantized checkpoint {src}, which holds no float weights to "
                                  "compare against", path=path, field="source",
                                  fix=f"give the float nested checkpoint it was quantized from: elastic-export "
                                      f"validate FLOAT_NESTED --build {path}")
        fam = load_family(src)  # there, and unchanged since the build
        fam.engines = {k: v for k, v in fam.engines.items() if not k.startswith("ort-")}
        fam.budgets = {b: fam.budgets[b] for b in fam.budgets if b in manifest.get("budgets", fam.budgets)}
        attach_build(fam, path, manifest)
    elif is_nested(path):
        ckpt = load_nested(path)
        fam = Family(ckpt.model, dict(ckpt.budgets), _tokenizer(ckpt.tokenizer_path, ckpt.config.vocab_size),
                     path=str(path))
        fam.engines.update(_torch_engine(fam))
        fam.engines.update(_ort_exports(fam))
    elif (path / "config.json").is_file():
        from elastic_export import full_subnet, load

        model = load(path)
        fam = Family(model, {"full": full_subnet(model.config)},
                     _tokenizer(path / "tokenizer", model.config.vocab_size), path=str(path))
        fam.engines.update(_torch_engine(fam))
    else:
        raise CheckpointError("is neither a nested checkpoint (elastic.json), a build directory (build.json, "
                              "trt_manifest.json) nor an HF checkpoint (config.json)", path=path,
                              fix="give the output of `elastic-export nest` or `elastic-export build`")
    for b in builds:
        attach_build(fam, Path(b))
    return fam


# ---- build directories and engines (issues 5 and 6) ------------------------------------------------

ONNX_MANIFEST, TRT_MANIFEST = "build.json", "trt_manifest.json"


def read_build_manifest(path: Path) -> dict | None:
    """The manifest of a build directory (checksums verified for ONNX builds), or None."""
    path = Path(path)
    if (path / ONNX_MANIFEST).is_file():
        from elastic_export.build import read_build, verify_build

        verify_build(path)
        return read_build(path)
    if (path / TRT_MANIFEST).is_file():
        import json

        try:
            return {"target": "trt", **json.loads((path / TRT_MANIFEST).read_text())}
        except json.JSONDecodeError as e:
            raise CheckpointError(f"is not valid JSON ({e})", path=path / TRT_MANIFEST) from None
    return None


def attach_build(fam: Family, path: Path, manifest: dict | None = None) -> None:
    """Add the engine of a build directory to ``fam.engines``: ort-<ssm mode> or trt, with a -bf16
    suffix for bf16 builds (and -2, -3... when the name is taken)."""
    from .thresholds import precision_name

    from elastic_export.qcheckpoint import is_quantized_nested

    if manifest is None and is_quantized_nested(path):
        attach_quantized(fam, Path(path))
        return
    manifest = manifest or read_build_manifest(path)
    if manifest is None:
        raise CheckpointError("is not a build directory (no build.json or trt_manifest.json)", path=path,
                              fix="run elastic-export build first")
    missing = [b for b in manifest.get("budgets", {}) if b not in fam.budgets]
    if missing:
        raise CheckpointError(f"holds budgets {missing} that the nested checkpoint does not have", path=path,
                              field="budgets", fix="validate the build against the checkpoint it was built from")
    precision = build_precision(manifest)
    suffix = "" if precision == "fp32" else f"-{precision}"

    if manifest.get("quant"):  # a quantized build (onnx_quant): its format's thresholds
        precision = manifest["quant"]["format"]
        suffix = f"-{precision}"
    if manifest.get("target") == "trt":
        name, factory = f"trt{suffix}", lambda: _trt_engine(path)
    else:
        name = f"ort-{manifest.get('ssm_op', 'standard')}{suffix}"
        factory = lambda: _ort_engine(path, fam.threads, fam.ort_upcast)  # noqa: E731
    base, k = name, 2
    while name in fam.engines:
        name, k = f"{base}-{k}", k + 1
    fam.engines[name] = (factory, precision)
    fam.build = fam.build or str(path)


def attach_quantized(fam: Family, path: Path) -> None:
    """Add the torch engine over a quantized nested checkpoint of the family (``elastic-export quantize``):
    ``torch-<format>``, judged with that format's thresholds (int4 runs torch's int4 kernel, as served)."""
    from elastic_export.nested import read_manifest

    manifest, cfg, budgets = read_manifest(path)
    if cfg.to_dict() != fam.model.config.to_dict():
        raise CheckpointError("was quantized from another model (its parent_config differs from the checkpoint's)",
                              path=path / "elastic.json", field="parent_config",
                              fix="validate the float nested checkpoint it was quantized from")
    missing = [b for b in fam.budgets if b not in budgets]
    if missing:
        raise CheckpointError(f"lacks budgets {missing} of the nested checkpoint", path=path / "elastic.json",
                              field="budgets", fix="quantize the nested checkpoint being validated")
    fmt = manifest["quantization"]["format"]

    def factory():
        from elastic_export.qcheckpoint import load_quantized_nested
        from engines.torch_engine import TorchEngine

        qm = load_quantized_nested(path)
        return TorchEngine(qm, {b: qm.budgets[b] for b in fam.budgets}, threads=fam.threads)

    name, k = f"torch-{fmt}", 2
    while name in fam.engines:
        name, k = f"torch-{fmt}-{k}", k + 1
    fam.engines[name] = (factory, fmt)


def build_precision(manifest: dict) -> str:
    """The thresholds a build is judged with: ``bf16`` when it computes in bf16 or stores weights rounded
    to bf16 from a float32 source; a bf16 build of a bf16 checkpoint computing in float32 holds the
    checkpoint's own numbers and is judged as float32 (builds that predate ``source_dtype``: as stored)."""
    from .thresholds import precision_name

    stored = precision_name(manifest.get("dtype", "float32"))
    compute = precision_name(manifest.get("compute_dtype", manifest.get("dtype", "float32")))
    source = manifest.get("source_dtype")
    if compute == "bf16" or (stored == "bf16" and (source is None or precision_name(source) != "bf16")):
        return "bf16"
    return "fp32"


def _torch_engine(fam: Family) -> dict:
    """The torch engine on the family's own weights (no copy), computing at their stored dtype."""
    try:
        from engines.torch_engine import TorchEngine
    except ImportError:
        return {}
    from .thresholds import precision_name

    return {"torch-engine": (lambda: TorchEngine(fam.model, fam.budgets, threads=fam.threads),
                             precision_name(fam.model.dtype))}


def _ort_engine(path: Path, threads: int | None = None, upcast: bool = False):
    from engines.ort_engine import OrtEngine

    return OrtEngine(path, threads=threads, upcast=upcast)


def _trt_engine(path: Path):
    from engines.trt.engine import TrtEngine

    return TrtEngine(path)


def _ort_exports(fam: Family) -> dict:
    """ONNX Runtime per SSM mode, each built from the nested checkpoint into a temporary directory (at the
    checkpoint's stored dtype, computing in float32: judged as float32)."""
    try:
        import onnxruntime  # noqa: F401
        from elastic_export.build import build  # noqa: F401
        from engines.ort_engine import OrtEngine  # noqa: F401
    except ImportError:
        return {}
    return {f"ort-{mode}": (lambda m=mode: _ort_from_export(fam, m), "fp32") for mode in ORT_MODES}


def _ort_from_export(fam: Family, mode: str):
    """Build the family's ONNX graphs for one SSM mode into a temporary directory and open them."""
    from elastic_export.build import build

    tmp = tempfile.TemporaryDirectory(prefix=f"ee-validate-{mode}-")
    engine = _ort_engine(build(fam.path, Path(tmp.name) / "build", ssm_op=mode), fam.threads, fam.ort_upcast)
    engine._validation_tmp = tmp  # the directory lives as long as the engine
    return engine


# ---- the recipe ------------------------------------------------------------------------------------

SMALL_MODEL_PARAMS = 20_000_000


def default_threads(params: int) -> int | None:
    """CPU threads when the user gives none: 1 below SMALL_MODEL_PARAMS, else the runtime's choice (None).
    A small model's decode steps are many tiny ops that gain nothing from a second thread, and on a
    busy machine its spin-waits cost several times over (the shipped model's validate, 2 cores: 37 s at 1
    and at 2 threads when idle; at load 2.8, 31 s at 1 thread against 198 s at 2)."""
    return 1 if params < SMALL_MODEL_PARAMS else None


def validate(family: Family, report_dir: str | Path | None = None, backends: list[str] | None = None,
             device: str | None = None, context: int = 8192, batch: int = 1,
             overrides: dict[str, dict[str, float]] | None = None, measure_memory: bool = True,
             budgets: list[str] | None = None, progress: bool = True, eval_kwargs: dict | None = None,
             memory_isolation: str | None = None, threads: int | None = None, release: bool = False) -> dict:
    """Run every check and (with ``report_dir``) write the report. Returns the report dict; its
    ``passed`` is False when any backend fails a threshold.

    Order: the float32 reference on every budget, the torch backends (they read ``family.model``),
    memory parity, then the engines over built artefacts (ONNX Runtime, TensorRT), which read their own
    weights. ``release`` (the command line, which owns the family) frees ``family.model``'s weights
    before the engines run, so that the process never holds the torch copy and an engine's together;
    the model keeps its config, on the meta device."""
    from elastic_export.accounting import count_params

    limits = apply_overrides(overrides)
    if threads is None and torch.device(family.model.device).type == "cpu":
        threads = default_threads(count_params(family.model.config))
    if threads is not None:  # this process's torch threads (restored on return), and the engines'
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        family.threads = threads
        try:
            return _validate(family, report_dir, backends, device, context, batch, limits, measure_memory, budgets,
                             progress, eval_kwargs, memory_isolation, release)
        finally:
            torch.set_num_threads(before)
    return _validate(family, report_dir, backends, device, context, batch, limits, measure_memory, budgets,
                     progress, eval_kwargs, memory_isolation, release)


TORCH_BACKENDS = ("torch", "sliced", "torch-engine")  # those that read family.model


def _validate(family, report_dir, backends, device, context, batch, limits, measure_memory, budgets, progress,
              eval_kwargs, memory_isolation, release=False) -> dict:
    from elastic_export import __version__
    from elastic_export.accounting import count_params, moe_summary

    from . import memory as memory_lib
    from . import planner
    from .report import write_report

    def say(msg: str) -> None:
        if progress:
            from tqdm.auto import tqdm

            tqdm.write(msg, file=sys.stderr)
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
    lazies = []
    for n in names:  # built one at a time inside run_parity, each closed before the next
        prec = family.engines[n][1] if n in family.engines else "fp32"
        lazies.append(Lazy(n, prec, None if n == TWIN else (lambda n=n: make_backend(n, family))))
    say(f"comparing {', '.join(names)} with the float32 reference on {len(budget_names)} budget(s)")
    first = [lz for lz in lazies if lz.name in TORCH_BACKENDS and lz.name != "sliced"]
    parity = run_parity(reference(family), first, data, limits, budget_names, progress=progress)

    mem = None
    if measure_memory:
        say("measuring memory: one process serving every budget, one process per standalone budget")
        # device memory on a GPU (bf16 there, as served), resident memory on the CPU (as stored)
        on_gpu = torch.cuda.is_available()
        mem = memory_lib.memory_parity(family.model, {b: family.budgets[b] for b in budget_names},
                                       torch.bfloat16 if on_gpu else family.model.dtype, nested_dir=family.path,
                                       measure=True, device="cuda" if on_gpu else "cpu", isolation=memory_isolation)
    rest = [lz for lz in lazies if lz not in first]
    if "sliced" in names:  # cut every budget to disk while the parent is here; run them after it is gone
        say("slicing every budget to a temporary directory")
        try:
            sliced = Sliced(family.model, {b: family.budgets[b] for b in budget_names}).write_all()
            make = lambda: sliced  # noqa: E731
        except Exception as e:  # noqa: BLE001 - a slicer that fails fails the sliced rows
            make = lambda e=e: (_ for _ in ()).throw(e)  # noqa: E731
        rest = [Lazy("sliced", "fp32", make) if lz.name == "sliced" else lz for lz in rest]
    if rest:
        if release:
            family.model.to("meta")  # the weights go; config and structure stay
            release_memory()
        more = run_parity(None, rest, data, limits, budget_names, progress=progress, refs=parity.pop("refs"))
        parity["rows"] += more["rows"]
    parity.pop("refs", None)
    plan = planner.plan(cfg, {b: family.budgets[b] for b in budget_names}, [device] if device else
                        list(planner.PROFILES), context, batch, dtypes=("bfloat16", "float32"))

    failures = [f"{r['backend']} / {r['budget']}: {'; '.join(r['failed'])}" for r in parity["rows"] if not r["passed"]]
    report = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tool_version": __version__,
        "machine": _machine(),
        "source": {"path": family.path, "build": family.build, "kind": "build" if family.build else "nested",
                   "reference": "torch elastic forward, float32",
                   "budgets": {b: {"params": count_params(cfg, family.budgets[b]), **moe_summary(cfg, family.budgets[b]),
                                   "subnet": family.budgets[b].to_dict()} for b in budget_names}},
        "eval": {"rows": list(data.rows.shape), "decode_steps": data.decode_steps, "n_tasks": len(data.tasks),
                 "task_source": data.task_source, "greedy_tokens": data.greedy_tokens,
                 "ort_weights": "float32" if family.ort_upcast else "stored"},
        "thresholds": {p: limits[p] for p in THRESHOLDS},
        "backends": list(dict.fromkeys(r["backend"] for r in parity["rows"])),
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
    from elastic_export.quant import FORMATS

    return name in ALL_BACKENDS or name.startswith(("ort-", "trt-", *(f"torch-{f}" for f in FORMATS)))


def _machine() -> dict:
    out = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.cuda.is_available(), "cpu_threads": torch.get_num_threads()}
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return out
