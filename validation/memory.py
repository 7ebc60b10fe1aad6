"""Memory parity: the nested family (one copy of the weights) against separate models of the same sizes.

Two kinds of figures:
- weight bytes, counted: on disk (the nested checkpoint's or build's weight files, against the
  standalone slices written side by side) and in memory (unique parameter storage of the loaded
  family, against the sum of the budgets' parameters at the same dtype);
- peak memory, measured in fresh processes (so nothing is shared by accident): one process loads
  the family and serves every budget in turn (prefill + decode steps each); one process per budget
  loads its standalone slice and serves it. Peak resident memory is the kernel's high-water mark
  (VmHWM) on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU. A process that imports the same
  libraries and builds the model on the meta device (no weights) gives the baseline, subtracted to
  show what the weights and the serving itself cost (the meta build alone imports ~150 MB of
  libraries, sympy among them, which would otherwise swamp a small model).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def tensor_bytes(model) -> int:
    """Bytes of a model's unique parameter and buffer storage (tied weights counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


# What holds weights on disk: a nested checkpoint's model.safetensors (not its router or importance
# scores), a build's weight file, its graphs and engines.
WEIGHT_FILES = ("model.safetensors", "weights.bin", "*.onnx", "*.onnx.data", "*.engine", "*.plan")


def dir_bytes(path: str | Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in Path(path).rglob(pattern) if f.is_file())


def weight_bytes(model, budgets: dict, dtype: torch.dtype = torch.float32, nested_dir: str | None = None,
                 slices_dir: str | None = None) -> dict:
    """Counted weight bytes of the family against separate models.

    ``nested_dir``: where the family's weights are on disk (nested checkpoint or build directory);
    ``slices_dir``: standalone slices, one sub-directory per budget (see :func:`write_slices`).
    """
    from elastic_export.accounting import count_params, dtype_bytes

    cfg = model.config
    nb = dtype_bytes(dtype)
    per = {n: count_params(cfg, s) * nb for n, s in budgets.items()}
    out = {"dtype": str(dtype).removeprefix("torch."),
           "memory": {"nested": count_params(cfg) * nb, "separate": sum(per.values()), "per_budget": per,
                      "loaded": tensor_bytes(model) * nb // model.dtype.itemsize}}
    if nested_dir is not None:
        out["disk"] = {"nested": sum(dir_bytes(nested_dir, p) for p in WEIGHT_FILES)}
        if slices_dir is not None:
            per_disk = {n: dir_bytes(Path(slices_dir) / n, "*.safetensors") for n in budgets}
            out["disk"].update({"separate": sum(per_disk.values()), "per_budget": per_disk})
    return out


def write_slices(model, budgets: dict, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Each budget as a standalone checkpoint in ``out_dir/NAME`` (elastic_export.slicing)."""
    from elastic_export.slicing import slice_budget

    out_dir = Path(out_dir)
    for name, subnet in budgets.items():
        slice_budget(model, subnet).save_pretrained(out_dir / name, dtype=dtype)
    return out_dir


def write_family(model, budgets: dict, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """The family as a nested checkpoint (elastic_export.nested), which the memory worker loads."""
    from elastic_export.nested import save_nested

    return save_nested(out_dir, model, budgets, dtype=dtype)


# ---- measured peaks -------------------------------------------------------------------------------

def _peak_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _serve(model, subnet, tokens: int, steps: int, device) -> None:
    ids = torch.randint(3, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache()
    with torch.no_grad():
        logits = model(ids.to(device), subnet=subnet, cache=cache, last_only=True)
        for _ in range(steps):
            logits = model(logits[:, -1:].argmax(-1), subnet=subnet, cache=cache)


def worker(spec: dict) -> dict:
    """Run in a fresh process: ``mode`` baseline | family | single. Returns peak bytes."""
    torch.set_num_threads(1)
    import elastic_export as ee

    device = torch.device(spec.get("device", "cpu"))
    dtype = getattr(torch, spec.get("dtype", "float32"))
    if device.type == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    if spec["mode"] == "baseline":  # the same imports and a model built on the meta device: no weights
        from elastic_export.hf_io import expected_shapes
        from elastic_export.nested import read_manifest

        expected_shapes(read_manifest(spec["path"])[1])
    elif spec["mode"] == "family":
        ckpt = ee.load_nested(spec["path"], dtype=dtype, device=device, verify=False)
        for subnet in ckpt.budgets.values():
            _serve(ckpt.model, subnet, spec["tokens"], spec["steps"], device)
    else:
        model = ee.load(spec["path"], dtype=dtype, device=device).eval()
        _serve(model, None, spec["tokens"], spec["steps"], device)
    out = {"rss": _peak_rss()}
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["device"] = torch.cuda.max_memory_allocated()
    return out


def _spawn(spec: dict) -> subprocess.Popen:
    roots = {str(Path(__file__).resolve().parents[1])}
    import elastic_export

    roots.add(str(Path(elastic_export.__file__).resolve().parents[1]))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*roots, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    code = "import json, sys; from validation.memory import worker; print(json.dumps(worker(json.loads(sys.argv[1]))))"
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def measure_peaks(family_dir: str | Path, slices_dir: str | Path, budgets: list[str], dtype: str = "float32",
                  device: str = "cpu", tokens: int = 64, steps: int = 16, parallel: int = 2) -> dict:
    """Peak memory of serving all budgets from one process against one process per budget.

    ``family_dir`` from :func:`write_family`, ``slices_dir`` from :func:`write_slices`.
    """
    base = {"dtype": dtype, "device": device, "tokens": tokens, "steps": steps}
    jobs = {"baseline": {**base, "mode": "baseline", "path": str(family_dir)}, "family": {**base, "mode": "family", "path": str(family_dir)}}
    for n in budgets:
        jobs[f"single:{n}"] = {**base, "mode": "single", "path": str(Path(slices_dir) / n)}
    results, running = {}, []
    pending = list(jobs.items())
    while pending or running:
        while pending and len(running) < parallel:
            name, spec = pending.pop(0)
            running.append((name, _spawn(spec)))
        name, proc = running.pop(0)
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker {name} failed: {stderr.strip().splitlines()[-1:]}")
        results[name] = json.loads(stdout.strip().splitlines()[-1])
    key = "device" if device.startswith("cuda") else "rss"
    baseline = results["baseline"][key]
    singles = {n: results[f"single:{n}"][key] for n in budgets}
    family = results["family"][key]
    return {
        "measure": "cuda max_memory_allocated" if key == "device" else "peak RSS (VmHWM)",
        "device": device, "dtype": dtype, "tokens": tokens, "decode_steps": steps,
        "baseline": baseline,
        "family": family, "separate_sum": sum(singles.values()), "per_budget": singles,
        "family_net": family - baseline if key == "rss" else family,
        "separate_net": sum(v - baseline for v in singles.values()) if key == "rss" else sum(singles.values()),
        "largest_single": max(singles.values()),
    }


def memory_parity(model, budgets: dict, dtype: torch.dtype = torch.float32, nested_dir: str | None = None,
                  measure: bool = True, device: str = "cpu", work_dir: str | None = None) -> dict:
    """Counted weight bytes and (``measure``) measured peaks of the family against separate models."""
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="ee-memory-") as tmp:
        slices = write_slices(model, budgets, Path(tmp) / "slices", dtype)
        fam = write_family(model, budgets, Path(tmp) / "family", dtype) if measure or nested_dir is None else None
        out = weight_bytes(model, budgets, dtype, nested_dir or fam, slices)
        if measure:
            out["peak"] = measure_peaks(fam, slices, list(budgets), str(dtype).removeprefix("torch."), device)
    return out
