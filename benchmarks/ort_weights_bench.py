"""ONNX Runtime over a bf16 build computing in float32: weights upcast once (``OrtEngine(upcast=True)``,
the serving default) against weights kept bf16 with the graphs' Casts run per call (``upcast=False``,
validate's default, ``--ort-weights stored``), side by side (issue 13).

Each mode runs in a fresh process (one after the other, the same build): every budget is loaded, then
each budget prefills PROMPT tokens (best of 3) and decodes STEPS tokens; the process reports its
resident memory growth over an interpreter that has imported the engine (VmRSS), and the logits it
produced, which the parent compares (max absolute difference). Printed as ratios stored / upcast.

    OMP_NUM_THREADS=1 python benchmarks/ort_weights_bench.py BUILD_DIR [--threads 1] [--steps 16]

BUILD_DIR: a bf16 ONNX build (`elastic-export build NESTED --target onnx` of a bf16 checkpoint, e.g.
the one benchmarks/scale_bench.py writes under WORK/100M/build).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

CHILD = textwrap.dedent("""
    import json, sys, time
    import torch
    from engines.ort_engine import OrtEngine

    def rss():
        return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) / 1024

    build, upcast, threads, steps, prompt, out = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), \\
        int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
    r0 = rss()
    eng = OrtEngine(build, threads=threads, upcast=upcast)
    res = {"load_mb": rss() - r0, "budgets": {}}
    g = torch.Generator().manual_seed(0)
    vocab = eng.manifest["config"]["vocab_size"]
    ids = torch.randint(0, vocab, (1, prompt), generator=g)
    toks = torch.randint(0, vocab, (steps + 1, 1), generator=g)
    logits = {}
    for b in eng.budgets:
        eng.set_budget(b)
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            lp = eng.prefill(ids)
            best = min(best, time.perf_counter() - t)
        eng.decode(toks[0])
        t = time.perf_counter()
        ld = [eng.decode(toks[i + 1]) for i in range(steps)]
        dec = (time.perf_counter() - t) / steps
        logits[b] = [lp] + ld
        res["budgets"][b] = {"prefill_ms": best * 1e3, "decode_ms": dec * 1e3}
    res["peak_mb"] = rss() - r0
    res["buffer_mb"] = eng.buffer.nbytes / 2**20
    torch.save(logits, out + ".pt")
    json.dump(res, open(out, "w"))
""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("build")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=32)
    args = ap.parse_args()
    m = json.loads((Path(args.build) / "build.json").read_text())
    if (m.get("dtype"), m.get("compute_dtype")) != ("bfloat16", "float32"):
        sys.exit(f"{args.build}: a bf16 build computing in float32 is needed (build.json has dtype "
                 f"{m.get('dtype')!r}, compute_dtype {m.get('compute_dtype')!r})")
    import torch

    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, flag in (("upcast", "1"), ("stored", "0")):
            out = os.path.join(tmp, mode)
            subprocess.run([sys.executable, "-c", CHILD, args.build, flag, str(args.threads), str(args.steps),
                            str(args.prompt), out], check=True)
            res[mode] = json.load(open(out))
            res[mode]["logits"] = torch.load(out + ".pt")
    diff = max(float((a - b).abs().max()) for k in res["upcast"]["logits"]
               for a, b in zip(res["upcast"]["logits"][k], res["stored"]["logits"][k]))
    print(f"load average {os.getloadavg()[0]:.2f}; threads {args.threads}; max |logit difference| {diff:.2e}")
    u, s = res["upcast"], res["stored"]
    print(f"weight buffer MB: upcast {u['buffer_mb']:.0f}, stored {s['buffer_mb']:.0f}")
    print(f"resident growth MB (all budgets loaded and run): upcast {u['peak_mb']:.0f}, stored {s['peak_mb']:.0f} "
          f"({s['peak_mb'] / u['peak_mb']:.2f}x)")
    print("| budget | prefill ms upcast | stored | stored / upcast | decode ms upcast | stored | stored / upcast |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for b, ub in u["budgets"].items():
        sb = s["budgets"][b]
        print(f"| {b} | {ub['prefill_ms']:.0f} | {sb['prefill_ms']:.0f} | {sb['prefill_ms'] / ub['prefill_ms']:.2f}x | "
              f"{ub['decode_ms']:.1f} | {sb['decode_ms']:.1f} | {sb['decode_ms'] / ub['decode_ms']:.2f}x |")


if __name__ == "__main__":
    main()
