"""Checkpoint bytes and resident memory of serving every budget with the torch engine: fp32, bf16, int8,
int4 nested checkpoints of the shipped model and of a ~100M random-weight family (issue 14).

For each size it writes the float nested checkpoint (fp32 and bf16) and quantizes the fp32 one
(`elastic-export quantize --quant int8 / int4`, rtn). Then each checkpoint is served in a fresh
process under /usr/bin/time -v: elastic_export.load, one TorchEngine over all budgets, each budget
prefilling 16 tokens and decoding 8. Peak RSS is set beside fp32's, raw and net of a process that
imports the same modules and builds a tiny model on the meta device (the baseline: building any model
on meta imported torch._dynamo through nn.init before issue 13's fix). Decode tokens/s is printed for
reference only (int4 runs torch's int4 kernel, elastic_export.qkernels; int8 dequantizes every layer
per token; benchmarks/decode_bench.py measures speed).

The 100M family: benchmarks/scale_bench.py's config (hidden 1024, 12 layers, vocab 16384), random
init, rank-major head order (random weights are as good in any order), budgets 75% and 50% with
widths multiples of 64 (plan --divisor 64), so every int4 block of 32 stays whole.

    nice python benchmarks/quant_memory.py --sizes shipped 100M --work /tmp/qmem [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SERVE = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    import elastic_export as ee
    from engines.torch_engine import TorchEngine
    if sys.argv[1] == "-":  # the fixed cost of any load: imports + a model built on meta (see the docstring)
        from elastic_export.model import build_model
        build_model(ee.ModelConfig(vocab_size=8, hidden_size=8, layers_block_type=["mlp"], intermediate_size=8),
                    device="meta")
        raise SystemExit
    m = ee.load(sys.argv[1])
    e = TorchEngine(m, m.budgets, threads=1)
    ids = torch.randint(0, m.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    for b in m.budgets:
        e.set_budget(b)
        logits = e.prefill(ids)
        t = time.perf_counter()
        for _ in range(8):
            logits = e.decode(logits[..., -1, :].argmax(-1).reshape(1))
        print(f"{b} {8 / (time.perf_counter() - t):.2f}")
""")


def family(size: str, work: Path) -> Path:
    """The float32 nested checkpoint of one size (the shipped model, or a random ~100M family)."""
    import elastic_export as ee
    from elastic_export.model import build_model
    from elastic_export.nested import save_nested
    from elastic_export.search import plan_budgets

    if size == "shipped":
        return ee.default_model_path()
    from benchmarks.scale_bench import config_for, parse_size

    cfg = config_for(parse_size(size)).replace(head_order="rank_major")
    model = build_model(cfg, seed=0)
    budgets = plan_budgets(cfg, ["75%", "50%"], embed_divisor=64, ffn_divisor=64)
    out = work / size / "fp32"
    save_nested(out, model, budgets)
    return out


def serve(path: str, malloc_threshold: bool = False) -> tuple[int, dict]:
    """(peak RSS bytes, budget -> decode tokens/s) of serving every budget of ``path`` in a fresh process.
    ``malloc_threshold``: MALLOC_MMAP_THRESHOLD_=1 MiB (glibc otherwise raises its mmap threshold after
    the first large free, and freed per-layer buffers stay in the heap)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if malloc_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    p = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", SERVE, path], capture_output=True, text=True,
                       env=env, cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"serving {path} failed:\n{p.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) * 1024
    rates = {ln.split()[0]: float(ln.split()[1]) for ln in p.stdout.splitlines() if len(ln.split()) == 2}
    return rss, rates


def main(argv=None) -> None:
    from elastic_export import quant
    from elastic_export.nested import load_nested, save_nested
    from elastic_export.qcheckpoint import quantize_nested

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", nargs="+", default=["shipped", "100M"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/quant_memory"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    base, _ = serve("-")
    results = {"baseline_rss": base, "sizes": {}}
    for size in args.sizes:
        d = args.work / size
        d.mkdir(parents=True, exist_ok=True)
        fp32 = family(size, args.work)
        ck = load_nested(fp32)
        paths = {"fp32": fp32, "bf16": d / "bf16", "int8": d / "int8", "int4": d / "int4"}
        save_nested(paths["bf16"], ck.model, {k: v for k, v in ck.budgets.items() if k != "full"}, dtype="bfloat16")
        del ck
        for fmt in ("int8", "int4"):
            quantize_nested(fp32, paths[fmt], quant.QuantSpec(fmt))
        rows = {}
        for name, p in [*paths.items(), *[(f"{k} (mmap threshold 1 MiB)", v) for k, v in paths.items()]]:
            rss, rates = serve(str(p), malloc_threshold="mmap" in name)
            rows[name] = {"bytes": sum(f.stat().st_size for f in Path(p).glob("*.safetensors")
                                       if f.name == "model.safetensors"), "rss": rss, "decode": rates}
            print(f"{size} {name}: {rows[name]['bytes'] / 1e6:.1f} MB, peak RSS {rss / 1e6:.0f} MB", file=sys.stderr)
        results["sizes"][size] = rows
        f = rows["fp32"]
        print(f"\n{size}: serving every budget with the torch engine (baseline process {base / 1e6:.0f} MB)")
        print("| weights | model.safetensors | x fp32 | peak RSS | x fp32 | RSS - baseline | x fp32 | decode tok/s "
              "(per budget) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for name, r in rows.items():
            f = rows["fp32 (mmap threshold 1 MiB)"] if "mmap" in name else rows["fp32"]
            net, fnet = r["rss"] - base, f["rss"] - base
            print(f"| {name} | {r['bytes'] / 1e6:.1f} MB | {r['bytes'] / f['bytes']:.2f} | {r['rss'] / 1e6:.0f} MB | "
                  f"{r['rss'] / f['rss']:.2f} | {net / 1e6:.0f} MB | {net / fnet:.2f} | "
                  + ", ".join(f"{b} {v:.1f}" for b, v in r["decode"].items()) + " |")
        if size != "shipped":
            shutil.rmtree(d, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
