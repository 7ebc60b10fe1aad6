"""Scale baseline (issue 13): peak memory and time of every command against the checkpoint's bytes.

Writes random-weight bf16 sharded HF nemotron_h checkpoints (Mamba, attention and MLP layers) of the
given sizes plus a small calibration text into a work dir, then runs each CLI step as a fresh
subprocess under ``/usr/bin/time -v`` (else a getrusage wrapper) with a per-step timeout:

    inspect  rank (--samples 2 --seq-len 128)  nest (--budget 75% --budget 50%)  slice (--budget all)
    build (onnx, weights as stored, all budgets)  run (torch engine on the nested checkpoint, 4 tokens)
    validate (the build; --tasks 2 --greedy-tokens 4 --no-memory)

Per step it prints wall time, peak RSS, peak RSS / checkpoint bytes against the issue's targets
(<= 1.3x nest, slice, build; <= 2x rank, validate) and, between consecutive sizes, the growth
exponent log(RSS_b / RSS_a) / log(params_b / params_a) (1.0 = linear in parameters) and the slope
dRSS / dbytes (peak bytes added per checkpoint byte added: what the step costs at 12B). The
targets are judged on the raw ratio; (RSS - base) / ckpt subtracts a process that only imports torch,
onnx, onnxruntime and the CLI.

    nice -n 10 python benchmarks/scale_bench.py --sizes 100M 500M --work /tmp/scale --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import elastic_export as ee
from elastic_export.hf_io import save_pretrained
from elastic_export.model import build_model, init_weights

REPO = Path(__file__).resolve().parents[1]
PATTERN = ["linear_attention", "mlp", "linear_attention", "full_attention", "mlp", "linear_attention", "mlp",
           "linear_attention", "mlp", "full_attention", "linear_attention", "mlp"]  # Nemotron-H's mix
STEPS = ("inspect", "rank", "nest", "slice", "build", "run", "validate")
TARGET = {"nest": 1.3, "slice": 1.3, "build": 1.3, "rank": 2.0, "validate": 2.0}  # x checkpoint bytes
CALIB = dict(samples=2, seq_len=128)
SHARD_BYTES = 64 * 2**20  # several shards even at 100M (NVIDIA ships ~5 GB shards)


def parse_size(s: str) -> int:
    m = re.fullmatch(r"([0-9.]+)([KMB]?)", s.strip().upper())
    if not m:
        raise SystemExit(f"--sizes: {s!r} is not a size like 100M or 1.5B")
    return int(float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}[m.group(2)])


def model_config(hidden: int, layers: int, vocab: int) -> ee.ModelConfig:
    """A Nemotron-H-like hybrid: Mamba2 (expand 2, head dim 64), GQA attention, relu2 MLP (4x)."""
    return ee.ModelConfig(vocab_size=vocab, hidden_size=hidden, layers_block_type=(PATTERN * 8)[:layers],
                          mamba_num_heads=hidden // 32, mamba_head_dim=64, n_groups=2, ssm_state_size=64,
                          conv_kernel=4, chunk_size=64, num_attention_heads=hidden // 64, num_key_value_heads=2,
                          head_dim=64, intermediate_size=4 * hidden, tie_word_embeddings=False)


def count_params(cfg: ee.ModelConfig) -> int:
    return build_model(cfg, device="meta").num_parameters()  # structure only, no memory


def config_for(target: int) -> ee.ModelConfig:
    """The hidden size (multiple of 128) whose parameter count lands nearest ``target`` at a depth for the size."""
    layers = 6 if target < 20e6 else 12 if target < 300e6 else 24 if target < 1e9 else 28
    vocab = 4096 if target < 20e6 else 16384
    best = None
    for hidden in range(128, 8192 + 1, 128):
        cfg = model_config(hidden, layers, vocab)
        n = count_params(cfg)
        if best is None or abs(n - target) < abs(best[0] - target):
            best = (n, cfg)
        if n > target:
            break
    return best[1]


@torch.no_grad()
def write_checkpoint(cfg: ee.ModelConfig, path: Path, shard_bytes: int = SHARD_BYTES, seed: int = 0) -> None:
    """Random bf16 weights: built on meta, materialized once in bf16, initialized tensor by tensor
    (one fp32 temporary at a time), written in shards."""
    model = build_model(cfg, device="meta", dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.fill_(1.0)  # norms; init_weights sets the rest
    init_weights(model, seed)
    save_pretrained(model, path, max_shard_bytes=shard_bytes)


def write_calibration(path: Path, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    words = ["state", "space", "model", "layer", "budget", "nested", "token", "memory", "scale", "weight",
             "the", "of", "and", "a", "to", "in", "is", "it", "each", "with"]
    idx = torch.randint(0, len(words), (2000,), generator=g).tolist()
    path.write_text(" ".join(words[i] for i in idx) + "\n")


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in sorted(path.glob("*.safetensors")))


def step_args(step: str, d: Path) -> list[str]:
    ck, calib = str(d / "parent"), str(d.parent / "calib.txt")
    return {
        "inspect": ["inspect", ck],
        "rank": ["rank", ck, "--calib", calib, "--out", str(d / "sorted"), "--samples", str(CALIB["samples"]),
                 "--seq-len", str(CALIB["seq_len"]), "--batch-size", str(CALIB["samples"]), "--no-progress"],
        "nest": ["nest", str(d / "sorted"), "--budget", "75%", "--budget", "50%", "--out", str(d / "nested")],
        "slice": ["slice", str(d / "nested"), "--budget", "all", "--out", str(d / "sliced")],
        "build": ["build", str(d / "nested"), "--target", "onnx", "--out", str(d / "build"), "--overwrite"],
        "run": ["run", str(d / "nested"), "--prompt", "The state space", "--max-new-tokens", "4"],
        "validate": ["validate", str(d / "build"), "--report", str(d / "report"), "--tasks", "2",
                     "--greedy-tokens", "4", "--no-memory", "--quiet"],
    }[step]


def _time_cmd() -> str | None:
    t = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    if t is None:
        return None
    ok = subprocess.run([t, "-v", "true"], capture_output=True, text=True)
    return t if "Maximum resident set size" in ok.stderr else None


def measure(cmd: list[str], timeout: float, log: Path) -> dict:
    """Run ``cmd`` as a fresh process: rc, wall seconds, peak RSS bytes (of that process and its children)."""
    tv = _time_cmd()
    rss_file = log.with_suffix(".rss")
    full = ([tv, "-v", "-o", str(rss_file)] if tv else [sys.executable, __file__, "--_rusage", str(rss_file), "--"]) + cmd
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    with open(log, "w") as out:
        p = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = 124
            _kill_children(p)  # /usr/bin/time then still reports the peak so far (a lower bound)
        finally:  # a timeout, or this process interrupted: the step's whole session goes too
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    wall = time.perf_counter() - t0
    text = rss_file.read_text() if rss_file.exists() else ""
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    rss = int(m.group(1)) * 1024 if m else None
    if rc != 124 and tv:
        m = re.search(r"Exit status: (\d+)", text)
        rc = int(m.group(1)) if m else rc
    return {"rc": rc, "wall_s": wall, "peak_rss": rss, "log": str(log), "timed_out": rc == 124}


def _kill_children(p: subprocess.Popen, grace: float = 10) -> None:
    """SIGKILL the measured command under the timing wrapper, and give the wrapper time to write its report."""
    try:
        kids = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
    except OSError:
        return
    for k in kids:
        try:
            os.kill(int(k), 9)
        except ProcessLookupError:
            pass
    try:
        p.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass


def _rusage_wrapper(rss_file: str, cmd: list[str]) -> None:
    rc = subprocess.call(cmd)
    kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kbytes on Linux
    Path(rss_file).write_text(f"Maximum resident set size (kbytes): {kb}\nExit status: {rc}\n")
    sys.exit(rc)


def cli(args: list[str]) -> list[str]:
    return [sys.executable, "-c", "from elastic_export.cli import main; main()", *args]


def bench_size(label: str, work: Path, steps, timeout: float) -> dict:
    d = work / label
    d.mkdir(parents=True, exist_ok=True)
    cfg = config_for(parse_size(label))
    gen = measure([sys.executable, __file__, "--_generate", json.dumps(cfg.to_dict("bfloat16")), str(d / "parent"),
                   str(SHARD_BYTES)],
                  timeout, d / "generate.log")
    if gen["rc"] != 0:
        raise SystemExit(f"generating {label} failed, see {gen['log']}")
    size = {"label": label, "params": count_params(cfg), "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers,
            "vocab": cfg.vocab_size, "ckpt_bytes": checkpoint_bytes(d / "parent"),
            "shards": len(list((d / "parent").glob("*.safetensors"))), "generate": gen, "steps": {}}
    for s in steps:
        r = measure(cli(step_args(s, d)), timeout, d / f"{s}.log")
        r["ratio"] = r["peak_rss"] / size["ckpt_bytes"] if r["peak_rss"] else None
        r["target"] = TARGET.get(s)
        r["pass"] = None if r["target"] is None or r["ratio"] is None else bool(r["ratio"] <= r["target"] and r["rc"] == 0)
        size["steps"][s] = r
        print(f"  {label} {s}: rc {r['rc']}, {r['wall_s']:.1f} s, {_gb(r['peak_rss'])} GB", file=sys.stderr, flush=True)
    return size


def growth(a: dict, b: dict, step: str) -> dict:
    ra, rb = a["steps"][step]["peak_rss"], b["steps"][step]["peak_rss"]
    if not ra or not rb or b["params"] == a["params"]:
        return {"exponent": None, "slope": None, "time_exponent": None}
    lp = math.log(b["params"] / a["params"])
    ta, tb = a["steps"][step]["wall_s"], b["steps"][step]["wall_s"]
    return {"exponent": math.log(rb / ra) / lp, "slope": (rb - ra) / (b["ckpt_bytes"] - a["ckpt_bytes"]),
            "time_exponent": math.log(tb / ta) / lp}


def _gb(n) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def _f(x, fmt) -> str:
    return "-" if x is None else format(x, fmt)


def table(sizes: list[dict], steps) -> str:
    lines = ["| size | params | ckpt GB | step | rc | wall s | peak RSS GB | RSS / ckpt | target | (RSS - base) / ckpt | "
             "growth exp. (RSS) | dRSS / dbytes | growth exp. (time) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, sz in enumerate(sizes):
        for s in steps:
            r = sz["steps"][s]
            g = sz.get("growth", {}).get(s, {})
            tgt = "-" if r["target"] is None else f"<= {r['target']}x {'pass' if r['pass'] else 'MISS'}"
            late = ">" if r.get("timed_out") else ""  # stopped at the timeout: lower bounds
            lines.append(f"| {sz['label']} | {sz['params']:,} | {_gb(sz['ckpt_bytes'])} | {s} | {r['rc']} | "
                         f"{late}{r['wall_s']:.1f} | {late}{_gb(r['peak_rss'])} | {_f(r['ratio'], '.2f')}x | {tgt} | {_f(r.get('net_ratio'), '.2f')}x | "
                         f"{_f(g.get('exponent'), '.2f')} | {_f(g.get('slope'), '.2f')} | "
                         f"{_f(g.get('time_exponent'), '.2f')} |")
    return "\n".join(lines)


def baseline(work: Path, timeout: float) -> dict:
    """Peak RSS of a process that only imports what the steps import (torch, onnx, onnxruntime, the CLI)."""
    return measure([sys.executable, "-c", "import torch, onnx, onnxruntime, elastic_export.cli"], timeout,
                   work / "baseline.log")


def run_bench(labels, work: Path, steps=STEPS, timeout: float = 1800,
              with_baseline: bool = True) -> tuple[dict | None, list[dict]]:
    bad = [s for s in steps if s not in STEPS]
    if bad:
        raise SystemExit(f"--steps: unknown {bad}; choose from {', '.join(STEPS)}")
    work.mkdir(parents=True, exist_ok=True)
    write_calibration(work / "calib.txt")
    base = baseline(work, timeout) if with_baseline else None
    sizes = []
    for label in labels:
        sizes.append(bench_size(label, work, steps, timeout))
        for r in sizes[-1]["steps"].values():
            ok = r["peak_rss"] and base and base["peak_rss"]
            r["net_ratio"] = (r["peak_rss"] - base["peak_rss"]) / sizes[-1]["ckpt_bytes"] if ok else None
        if len(sizes) > 1:
            sizes[-1]["growth"] = {s: growth(sizes[-2], sizes[-1], s) for s in steps}
    return base, sizes


def print_saved(paths) -> list[dict]:
    """One table from several runs' JSON (e.g. one size per run), growth recomputed between consecutive sizes."""
    sizes = [sz for p in paths for sz in json.loads(Path(p).read_text())["sizes"]]
    steps = [s for s in STEPS if all(s in sz["steps"] for sz in sizes)]
    for a, b in zip(sizes, sizes[1:]):
        b["growth"] = {s: growth(a, b, s) for s in steps}
    print(table(sizes, steps))
    return sizes


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_rusage"]:
        return _rusage_wrapper(argv[1], argv[3:])
    if argv[:1] == ["--_generate"]:
        return write_checkpoint(ee.ModelConfig.from_dict(json.loads(argv[1])), Path(argv[2]), int(argv[3]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["100M", "500M", "1.5B"])
    ap.add_argument("--work", default="scale_work", help="Work dir for checkpoints, outputs and logs.")
    ap.add_argument("--steps", default=",".join(STEPS), help="Comma-separated subset (in order).")
    ap.add_argument("--timeout", type=float, default=1800, help="Seconds per step.")
    ap.add_argument("--json", default=None, help="Also write the measurements as JSON.")
    ap.add_argument("--from-json", nargs="+", default=None, help="Print the table of earlier --json runs "
                    "(sizes in the order given, growth between them) instead of measuring.")
    a = ap.parse_args(argv)
    if a.from_json:
        return print_saved(a.from_json)
    steps = [s for s in a.steps.split(",") if s]
    load0 = os.getloadavg()
    base, sizes = run_bench(a.sizes, Path(a.work), steps, a.timeout)
    load1 = os.getloadavg()
    print(f"checkpoints: random bf16, sharded at {SHARD_BYTES >> 20} MiB; rank on {CALIB['samples']} x "
          f"{CALIB['seq_len']} calibration tokens; {os.cpu_count()} CPUs; load average before "
          f"{' '.join(f'{x:.2f}' for x in load0)}, after {' '.join(f'{x:.2f}' for x in load1)}; "
          f"peak RSS by {'/usr/bin/time -v' if _time_cmd() else 'getrusage(RUSAGE_CHILDREN)'}; base = "
          f"{_gb(base['peak_rss'])} GB (a process importing torch, onnx, onnxruntime and the CLI)")
    for sz in sizes:
        print(f"{sz['label']}: {sz['params']:,} parameters ({sz['layers']} layers x {sz['hidden']}, vocab "
              f"{sz['vocab']}), {sz['ckpt_bytes']:,} bytes in {sz['shards']} shards; generated in "
              f"{sz['generate']['wall_s']:.1f} s, {_gb(sz['generate']['peak_rss'])} GB peak")
    print(table(sizes, steps))
    if a.json:
        Path(a.json).write_text(json.dumps({"baseline": base, "sizes": sizes}, indent=2) + "\n")
    return base, sizes


if __name__ == "__main__":
    main()
