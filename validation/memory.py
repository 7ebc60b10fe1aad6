"""Memory parity: the nested family (one copy of the weights) against separate models of the same sizes.

Two kinds of figures:
- weight bytes, counted: on disk (the nested checkpoint's or build's weight files, against the
  standalone slices written side by side) and in memory (unique parameter storage of the loaded
  family, against the sum of the budgets' parameters at the same dtype);
- peak memory, measured in separate processes (so nothing is shared by accident): one process
  loads the family and serves every budget in turn (prefill + decode steps each); one process per
  budget loads its standalone slice and serves it. Peak resident memory is the kernel's high-water
  mark (VmHWM) on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU. A process that imports the
  same libraries and builds the model on the meta device (no weights) gives the baseline,
  subtracted to show what the weights and the serving itself cost (the meta build alone imports
  ~150 MB of libraries, sympy among them, which would otherwise swamp a small model).
  On a Linux CPU the processes are forked from one fresh interpreter (imports paid once, see
  :func:`forked`); ``isolation="spawn"`` starts a fresh interpreter for each instead.
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
    """Run in a fresh (or freshly forked) process: ``mode`` baseline | family | single. Returns peak bytes."""
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


def _python(code: str, arg: str) -> subprocess.Popen:
    """A fresh interpreter that can import validation and elastic_export from where they are now."""
    import elastic_export

    roots = [str(Path(__file__).resolve().parents[1]), str(Path(elastic_export.__file__).resolve().parents[1])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*dict.fromkeys(roots), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", code, arg], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(name: str, proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker {name} failed: {stderr.strip().splitlines()[-1:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def forked(jobs: dict[str, dict]) -> dict[str, dict]:
    """Run in one fresh process: import once, measure the baseline here, then fork one child per job.

    A child starts as a copy of this process (imports and the meta-built model). Its RSS counts only
    the shared library pages it touches again, so children are compared with a child that does the
    baseline work (``baseline``), and this process's own peak (``process``: what a fresh process with
    the same imports reaches) turns the children's net figures into whole-process ones. CPU only
    (CUDA must not be initialized before a fork).
    """
    out = {"process": worker(jobs["baseline"])}
    for name, spec in jobs.items():
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, report through the pipe, leave without cleanup
            os.close(r)
            try:
                payload = json.dumps(worker(spec))
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                payload = json.dumps({"error": f"{type(e).__name__}: {e}"})
            os.write(w, payload.encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            data = f.read()
        os.waitpid(pid, 0)
        res = json.loads(data) if data else {"error": "child died"}
        if "error" in res:
            raise RuntimeError(f"memory worker {name} failed: {res['error']}")
        out[name] = res
    return out


def measure_peaks(family_dir: str | Path, slices_dir: str | Path, budgets: list[str], dtype: str = "float32",
                  device: str = "cpu", tokens: int = 64, steps: int = 16, isolation: str | None = None) -> dict:
    """Peak memory of serving all budgets from one process against one process per budget.

    ``family_dir`` from :func:`write_family`, ``slices_dir`` from :func:`write_slices`.
    ``isolation``: ``fork`` (one fresh interpreter forks a process per measurement; the default on a
    Linux CPU) or ``spawn`` (a fresh interpreter per measurement; always on a GPU).
    """
    if isolation is None:
        isolation = "fork" if hasattr(os, "fork") and not device.startswith("cuda") else "spawn"
    base = {"dtype": dtype, "device": device, "tokens": tokens, "steps": steps}
    jobs = {"baseline": {**base, "mode": "baseline", "path": str(family_dir)},
            "family": {**base, "mode": "family", "path": str(family_dir)}}
    for n in budgets:
        jobs[f"single:{n}"] = {**base, "mode": "single", "path": str(Path(slices_dir) / n)}
    code = "import json, sys; from validation.memory import {0}; print(json.dumps({0}(json.loads(sys.argv[1]))))"
    if isolation == "fork":
        results = _result("forked", _python(code.format("forked"), json.dumps(jobs)))
    else:
        results = {name: _result(name, _python(code.format("worker"), json.dumps(spec))) for name, spec in jobs.items()}
    key = "device" if device.startswith("cuda") else "rss"
    baseline = results["baseline"][key]
    singles = {n: results[f"single:{n}"][key] for n in budgets}
    family = results["family"][key]
    if key == "rss":
        net = {n: v - baseline for n, v in singles.items()}
        family_net = family - baseline
        if isolation == "fork":  # whole processes: a fresh process's baseline plus what each child added
            baseline = results["process"]["rss"]
            singles = {n: baseline + v for n, v in net.items()}
            family = baseline + family_net
    else:
        net, family_net = singles, family
    return {
        "measure": "cuda max_memory_allocated" if key == "device" else "peak RSS (VmHWM)",
        "isolation": isolation, "device": device, "dtype": dtype, "tokens": tokens, "decode_steps": steps,
        "baseline": baseline if key == "rss" else 0,
        "family": family, "separate_sum": sum(singles.values()), "per_budget": singles,
        "family_net": family_net, "separate_net": sum(net.values()), "per_budget_net": net,
        "largest_single": max(singles.values()),
    }


def memory_parity(model, budgets: dict, dtype: torch.dtype = torch.float32, nested_dir: str | None = None,
                  measure: bool = True, device: str = "cpu", work_dir: str | None = None,
                  isolation: str | None = None) -> dict:
    """Counted weight bytes and (``measure``) measured peaks of the family against separate models.

    The family and the standalone slices are written side by side at ``dtype`` into a temporary
    directory (both measured from there, so the comparison is like for like); ``nested_dir``, the
    checkpoint as given, is reported for information (``disk.source``).
    """
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="ee-memory-") as tmp:
        slices = write_slices(model, budgets, Path(tmp) / "slices", dtype)
        fam = write_family(model, budgets, Path(tmp) / "family", dtype)
        out = weight_bytes(model, budgets, dtype, fam, slices)
        if nested_dir is not None:
            out["disk"]["source"] = sum(dir_bytes(nested_dir, p) for p in WEIGHT_FILES)
        if measure:
            out["peak"] = measure_peaks(fam, slices, list(budgets), str(dtype).removeprefix("torch."), device,
                                        isolation=isolation)
    return out
