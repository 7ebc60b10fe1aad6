"""Torch engine decode tokens/s of this tree against another git revision, side by side in one run.

    python benchmarks/decode_ab.py --baseline main            # hybrid-5m, a 3-budget family
    python benchmarks/decode_ab.py --baseline main --nested PATH

Both trees serve the same nested checkpoint (written once, by this tree, unless --nested is given),
each in its own subprocess with its own ``elastic_export`` and ``engines`` (the baseline from
``git archive REV``). The subprocesses alternate (A B A B ...) for --rounds rounds, and each reports
the best of --reps interleaved runs per budget and engine (torch: the dynamic step; torch-static:
the compiled fixed-shape step); the table shows the best over rounds, in wall-clock tokens/s and in
tokens per CPU-second (less disturbed by other processes on a shared machine), and new / baseline.
The load average (uptime) before and after says how busy the machine was.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys, time, torch
sys.path.insert(0, {root!r})
torch.set_num_threads({threads})
torch.set_grad_enabled(False)
from elastic_export.build import load_family
from engines.torch_engine import TorchEngine
model, fam, _ = load_family({nested!r})
ids = torch.randint(0, model.config.vocab_size, (1, {prompt}), generator=torch.Generator().manual_seed(0))
engines = {{"torch": TorchEngine(model, fam), "torch-static": TorchEngine(model, fam, static=True,
                                                                      max_len={prompt} + 4 * {steps} + 16)}}
def run(eng, name):
    eng.set_budget(name)
    tok = eng.prefill(ids, last_only=True).argmax(-1)
    for _ in range(3):
        eng.decode(tok)
    t, c = time.perf_counter(), time.process_time()
    for _ in range({steps}):
        eng.decode(tok)
    return {steps} / (time.perf_counter() - t), {steps} / (time.process_time() - c)
best = {{}}
for _ in range({reps}):
    for name in fam:
        for kind, eng in engines.items():
            w, c = run(eng, name)
            key = name + "|" + kind
            best[key] = [max(w, best.get(key, [0, 0])[0]), max(c, best.get(key, [0, 0])[1])]
print(json.dumps(best))
"""


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def measure(root: Path, args, nested: Path) -> dict:
    code = WORKER.format(root=str(root), threads=args.threads, nested=str(nested), prompt=args.prompt_len,
                         steps=args.steps, reps=args.reps)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the tree given, nothing else
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env)
    if out.returncode:
        sys.exit(f"worker in {root} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="main", help="git revision to compare against")
    ap.add_argument("--nested", help="nested checkpoint (default: a random hybrid-5m family)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ee-ab-"))
    base = work / "baseline"
    base.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
    if args.nested:
        nested = Path(args.nested).resolve()
    else:
        sys.path.insert(0, str(ROOT))
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from decode_bench import bench_family

        from elastic_export.config import preset
        from elastic_export.model import build_model
        from elastic_export.nested import save_nested

        cfg = preset("hybrid-5m", head_order="rank_major")
        nested = save_nested(work / "nested", build_model(cfg, seed=0), bench_family(cfg))
    print(f"before: {uptime()}")
    trees = {"new": ROOT, "baseline": base}
    best: dict[str, dict] = {"new": {}, "baseline": {}}
    for r in range(args.rounds):
        for label, root in (trees.items() if r % 2 == 0 else reversed(trees.items())):
            for key, (w, c) in measure(root, args, nested).items():
                old = best[label].get(key, (0.0, 0.0))
                best[label][key] = (max(old[0], w), max(old[1], c))
    print(f"after:  {uptime()}")
    print(f"{args.threads} thread(s), prompt {args.prompt_len}, {args.steps} steps, best of {args.reps} x "
          f"{args.rounds} rounds; this tree vs {args.baseline}")
    print(f"{'budget':<8} {'engine':<13} {'tok/s new':>10} {'baseline':>9} {'ratio':>6}   "
          f"{'tok/CPU-s new':>13} {'baseline':>9} {'ratio':>6}")
    for key in best["new"]:
        (nw, nc), (bw, bc) = best["new"][key], best["baseline"][key]
        name, kind = key.split("|")
        print(f"{name:<8} {kind:<13} {nw:>10.0f} {bw:>9.0f} {nw / bw:>6.2f}   {nc:>13.0f} {bc:>9.0f} {nc / bc:>6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"baseline": args.baseline, "best": best}, indent=2))


if __name__ == "__main__":
    main()
