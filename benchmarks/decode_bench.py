"""Per budget: prefill latency and decode tokens/s of the torch and ONNX Runtime engines, side by side
with transformers' cached decode on the same weights (full budget, a standalone HF checkpoint); the
ratio of each to the memory-bandwidth limit; resident memory of serving all budgets against one.

    python benchmarks/decode_bench.py --threads 2            # hybrid-5m, a 3-budget family
    python benchmarks/decode_bench.py --nested PATH          # a real nested checkpoint
    python benchmarks/decode_bench.py --size 100M --quant int8 int4 --accuracy 4 0 --stat median
        # a random ~100M family (benchmarks/scale_bench.py's shape), quantized ONNX Runtime builds beside
        # the float engines: decode and prefill ratios to the best float32 engine, resident memory, bytes
        # (quantized builds in both SSM forms, as the float32 ones: ort-int4-acc4 standard, ort-dec-... decomposed)

Bandwidth limit = (bytes of the weights one decode step reads) / (measured copy bandwidth): the
fastest a bandwidth-bound decode can go. Each figure is the best of --reps interleaved runs, since the
machine may be shared; tok/CPU-s divides by the process's CPU time instead of wall time, which
other processes on the same cores barely disturb at one thread. Memory is measured in fresh subprocesses (VmRSS growth
from after imports to after a prefill and a few decode steps).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from elastic_export.config import preset  # noqa: E402
from elastic_export.elastic import LayerWidths, Subnet, full_subnet  # noqa: E402
from elastic_export.model import build_model  # noqa: E402


def bench_family(cfg) -> dict[str, Subnet]:
    """full; 'medium': 3/4 of heads and FFN; 'small': half of them and 3/4 of the embedding width."""
    full = full_subnet(cfg)

    def scaled(f: float, hidden: int) -> Subnet:
        G, kv = cfg.n_groups, cfg.num_key_value_heads
        layers = []
        for w in full.layers:
            if w.mamba_heads:
                layers.append(LayerWidths(mamba_heads=max(G, int(w.mamba_heads * f) // G * G),
                                          mamba_head_dim=w.mamba_head_dim))
            elif w.attn_heads:
                layers.append(LayerWidths(attn_heads=max(kv, int(w.attn_heads * f) // kv * kv)))
            else:
                layers.append(LayerWidths(ffn=int(w.ffn * f)))
        return Subnet(hidden, tuple(layers))

    return {"full": full, "medium": scaled(0.75, cfg.hidden_size), "small": scaled(0.5, cfg.hidden_size * 3 // 4)}


def weight_bytes(model, subnet: Subnet) -> int:
    """Bytes of the weights one decode step of this budget reads (embedding: one row)."""
    _, views = model.layer_views(subnet)
    head = model.lm_head_weight[:, :subnet.hidden]
    total = head.numel() * head.element_size()
    for v in views:
        if v is None:
            continue
        for t in v:
            if isinstance(t, torch.Tensor) and t is not getattr(v, "fused", None):
                total += t.numel() * t.element_size()
    return total


def copy_bandwidth() -> float:
    a = torch.empty(64 * 2 ** 20 // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        best = max(best, 2 * a.numel() * 4 / (time.perf_counter() - t))  # read + write
    return best


def time_engine(engine, budget, ids, steps, prefills: int = 3):
    """(prefill seconds: the best of ``prefills``, decode tokens/s, decode tokens per CPU-second) of one
    engine and budget."""
    engine.set_budget(budget)
    prefill = float("inf")
    for _ in range(prefills):  # one prefill is a single ~0.1-0.3 s call: the fastest of a few is the figure
        t = time.perf_counter()
        logits = engine.prefill(ids, last_only=True)
        prefill = min(prefill, time.perf_counter() - t)
    tok = torch.as_tensor(logits).argmax(-1)
    for _ in range(3):
        engine.decode(tok)
    t, c = time.perf_counter(), time.process_time()
    for _ in range(steps):
        engine.decode(tok)
    return prefill, steps / (time.perf_counter() - t), steps / (time.process_time() - c)


class Transformers:
    """transformers' NemotronHForCausalLM on a standalone checkpoint; decode timed through generate."""

    def __init__(self, path):
        from transformers import NemotronHForCausalLM

        self.m = NemotronHForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()

    def time(self, ids, steps):
        with torch.no_grad():
            t, c = time.perf_counter(), time.process_time()
            self.m(ids, use_cache=True)
            prefill, prefill_cpu = time.perf_counter() - t, time.process_time() - c
            t, c = time.perf_counter(), time.process_time()
            self.m.generate(ids, max_new_tokens=steps + 1, do_sample=False, min_new_tokens=steps + 1)
            total, total_cpu = time.perf_counter() - t, time.process_time() - c
        return prefill, steps / max(total - prefill, 1e-9), steps / max(total_cpu - prefill_cpu, 1e-9)


def best_of(reps, fns, stat: str = "best"):
    """Run every measurement ``reps`` times, interleaved (the machine is shared); keep the best of each
    (``stat`` median: the median of each figure)."""
    runs: dict = {}
    for _ in range(reps):
        for key, fn in fns.items():
            runs.setdefault(key, []).append(fn())
    if stat == "median":
        import statistics

        return {k: tuple(statistics.median(r[j] for r in v) for j in range(3)) for k, v in runs.items()}
    return {k: (min(r[0] for r in v), max(r[1] for r in v), max(r[2] for r in v)) for k, v in runs.items()}


MEM_WORKER = r"""
import json, sys, torch
torch.set_num_threads({threads})
import onnxruntime
sys.path.insert(0, {root!r})
from engines.ort_engine import OrtEngine
from engines.torch_engine import TorchEngine
from elastic_export.build import load_family
import elastic_export.importance, elastic_export.nested
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
from elastic_export.config import preset
from elastic_export.elastic import full_subnet
from elastic_export.model import build_model
tiny = build_model(preset("hybrid-5m", hidden_size=64, vocab_size=128, intermediate_size=64))
warm = TorchEngine(tiny, {{"full": full_subnet(tiny.config)}})  # touch torch's kernels before measuring
warm.prefill(torch.ones(1, 64, dtype=torch.long), last_only=True); warm.decode(torch.ones(1, dtype=torch.long))
del warm, tiny
base = rss()  # after every import: what remains is weights, sessions, states and activations
budgets = {budgets!r}
if {engine!r} == "ort":
    eng = OrtEngine({build!r}, budgets=budgets, threads={threads}, share_weights={share!r})
else:
    model, fam, _ = load_family({nested!r})
    eng = TorchEngine(model, {{n: fam[n] for n in budgets}}, threads={threads})
ids = torch.randint(0, 100, (1, 64))
for b in budgets:
    eng.set_budget(b)
    eng.prefill(ids, last_only=True)
    for _ in range(8):
        eng.decode(ids[:, -1])
print(json.dumps(rss() - base))
"""


def resident(engine, budgets, build, nested, threads, share=True) -> int:
    code = MEM_WORKER.format(threads=threads, root=str(ROOT), budgets=budgets, engine=engine, build=str(build),
                             nested=str(nested), share=share)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


WIDE = dict(hidden_size=768, vocab_size=16384, mamba_num_heads=24, mamba_head_dim=64, num_attention_heads=12,
            head_dim=64, intermediate_size=2304)


def memory(nested, build_dir, fam, threads, quant_builds: dict | None = None, unshared: bool = True,
           quant_nested: dict | None = None) -> dict:
    """Resident memory of the largest budget alone and of every budget: torch, ONNX Runtime (shared,
    unshared), each quantized build (label -> build directory) and the torch engine over each quantized
    nested checkpoint (label -> its directory)."""
    names = list(fam)
    out = {}
    runs = [("torch", True, None, "torch", nested), ("ort", True, build_dir, "ort", nested)]
    if unshared:
        runs.append(("ort", False, build_dir, "ort, unshared", nested))
    runs += [("ort", True, d, label, nested) for label, d in (quant_builds or {}).items()]
    runs += [("torch", True, None, label, d) for label, d in (quant_nested or {}).items()]
    for eng, share, bdir, label, src in runs:
        one = resident(eng, names[:1], bdir or build_dir, src, threads, share)
        every = resident(eng, names, bdir or build_dir, src, threads, share)
        out[label] = {"largest_alone": one, "all": every, "ratio": every / one}
        print(f"resident {label:<13}: largest budget alone {one / 2 ** 20:6.1f} MiB, all {len(names)} budgets "
              f"{every / 2 ** 20:6.1f} MiB ({every / one:.2f}x)")
    base = min(out["ort"]["all"], out["torch"]["all"])  # the leaner fp32 engine serving every budget
    for label in [*(quant_builds or {}), *(quant_nested or {})]:
        print(f"resident, all budgets, {label}: {out[label]['all'] / out['ort']['all']:.2f}x fp32 ORT's, "
              f"{out[label]['all'] / out['torch']['all']:.2f}x fp32 torch's, {out[label]['all'] / base:.2f}x the "
              f"leaner fp32 engine's (largest alone {out[label]['largest_alone'] / out['ort']['largest_alone']:.2f}x "
              f"fp32 ORT's)")
    return out


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def size_config(size: str):
    """A random ~``size`` hybrid of benchmarks/scale_bench.py's shape (widths multiples of 128)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from scale_bench import config_for, parse_size

    return config_for(parse_size(size)).replace(head_order="rank_major")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nested", help="nested checkpoint (default: a random hybrid-5m family)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--size", help="a random family of about this many parameters (e.g. 100M) instead of hybrid-5m")
    ap.add_argument("--quant", nargs="*", default=[], choices=["int8", "int4"],
                    help="quantized ONNX Runtime builds to time beside the float engines")
    ap.add_argument("--accuracy", nargs="*", type=int, default=[4], help="MatMulNBits accuracy levels (4, 0)")
    ap.add_argument("--quant-ssm-op", nargs="*", default=["standard", "decomposed"],
                    choices=["standard", "decomposed"],
                    help="SSM forms of the quantized builds (as for float32, both: the best one is compared)")
    ap.add_argument("--stat", choices=["best", "median"], default="best")
    ap.add_argument("--no-static", action="store_true", help="skip the compiled torch decode (compiles seconds)")
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    from elastic_export.build import build, load_family
    from elastic_export.nested import save_nested
    from engines.ort_engine import OrtEngine
    from engines.torch_engine import TorchEngine

    work = Path(tempfile.mkdtemp(prefix="ee-bench-"))
    if args.nested:
        nested = Path(args.nested)
    else:
        cfg = size_config(args.size) if args.size else preset("hybrid-5m", head_order="rank_major")
        model = build_model(cfg, seed=0)
        nested = save_nested(work / "nested", model, bench_family(cfg))
    model, fam, _ = load_family(nested)
    build(nested, work / "build", target="onnx")
    build(nested, work / "build_decomposed", target="onnx", ssm_op="decomposed")
    qbuilds = {}
    for fmt in args.quant:
        for acc in args.accuracy:
            if fmt == "int8" and acc == 0 and 4 in args.accuracy and args.size:
                print("(int8 at accuracy 0 has no fast CPU kernel in ONNX Runtime 1.32: timed anyway)")
            for op in args.quant_ssm_op:  # labels: ort-int4-acc4 (standard SSM), ort-dec-int4-acc4 (decomposed)
                label = f"ort-{'dec-' if op == 'decomposed' else ''}{fmt}-acc{acc}"
                qbuilds[label] = build(nested, work / f"build_{fmt}_{acc}_{op}", target="onnx", quant=fmt,
                                       quant_accuracy=acc, ssm_op=op)
    qnested = {}  # the torch engine over quantized nested checkpoints (int4: torch's int4 kernel)
    for fmt in args.quant:
        from elastic_export import quant
        from elastic_export.qcheckpoint import quantize_nested

        quantize_nested(nested, work / f"nested_{fmt}", quant.QuantSpec(fmt))
        qnested[f"torch-{fmt}"] = work / f"nested_{fmt}"
    hf = work / "hf_full"
    model.save_pretrained(hf)  # the full budget as a standalone HF checkpoint (same weights)

    bw = copy_bandwidth()
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    te = TorchEngine(model, fam, threads=args.threads)
    ts = None if args.no_static else TorchEngine(model, fam, threads=args.threads, static=True,
                                                 max_len=args.prompt_len + args.steps + 8)
    oe = OrtEngine(work / "build", threads=args.threads)
    od = OrtEngine(work / "build_decomposed", threads=args.threads)
    qe = {label: OrtEngine(d, threads=args.threads) for label, d in qbuilds.items()}
    for label, d in qnested.items():
        import elastic_export as ee

        qm = ee.load(d)
        qe[label] = TorchEngine(qm, fam, threads=args.threads)  # quantized from ``nested``: its budgets
    rows = []
    print(f"{model.num_parameters() / 1e6:.2f}M parameters, {args.threads} threads, prompt {args.prompt_len}, "
          f"copy bandwidth {bw / 1e9:.1f} GB/s, {args.stat} of {args.reps} interleaved runs")
    fns = {}
    for name in fam:
        fns[(name, "torch")] = lambda name=name: time_engine(te, name, ids, args.steps)
        if not args.no_static:
            fns[(name, "torch-static")] = lambda name=name: time_engine(ts, name, ids, args.steps)
        fns[(name, "ort-standard")] = lambda name=name: time_engine(oe, name, ids, args.steps)
        fns[(name, "ort-decomposed")] = lambda name=name: time_engine(od, name, ids, args.steps)
        for label, e in qe.items():
            fns[(name, label)] = lambda name=name, e=e: time_engine(e, name, ids, args.steps)
    first = next(iter(fam))
    if not args.no_transformers:
        tf = Transformers(hf)
        fns[(first, "transformers")] = lambda: tf.time(ids, args.steps)
    import os

    print(f"load average before: {os.getloadavg()[0]:.2f}")
    best = best_of(args.reps, fns, args.stat)
    print(f"load average after: {os.getloadavg()[0]:.2f}; figures: {args.stat} of {args.reps} interleaved runs")
    print(f"{'budget':<8} {'engine':<15} {'prefill ms':>10} {'decode tok/s':>12} {'tok/CPU-s':>9} "
          f"{'limit tok/s':>11} {'% limit':>7}")
    for (name, eng), (pre, tps, cpu_tps) in best.items():
        limit = bw / weight_bytes(model, fam[name])
        rows.append({"budget": name, "engine": eng, "prefill_ms": pre * 1e3, "decode_tok_s": tps,
                     "decode_tok_per_cpu_s": cpu_tps, "limit_tok_s": limit, "frac_limit": tps / limit})
        print(f"{name:<8} {eng:<15} {pre * 1e3:>10.1f} {tps:>12.0f} {cpu_tps:>9.0f} {limit:>11.0f} "
              f"{100 * tps / limit:>6.0f}%")
    floats = [e for e in ("torch", "torch-static", "ort-standard", "ort-decomposed") if (first, e) in best]
    if (first, "transformers") in best:
        tf = best[(first, "transformers")]
        for col, label in ((1, "wall clock"), (2, "CPU time")):
            top = max(best[(first, e)][col] for e in floats)
            print(f"full budget, {label}: best engine / transformers = {top / tf[col]:.1f}x")
    for name in fam:  # quantized builds against the best float32 engine of the same budget, side by side
        top = max(floats, key=lambda e: best[(name, e)][1])
        for label in qe:
            pre, tps, cpu = best[(name, label)]
            fastest = min(floats, key=lambda e: best[(name, e)][0])
            line = (f"{name:<8} {label}: decode {tps / best[(name, top)][1]:.2f}x the best fp32 engine ({top}), "
                    f"{cpu / max(best[(name, e)][2] for e in floats):.2f}x per CPU-s; prefill speed "
                    f"{best[(name, 'ort-standard')][0] / pre:.2f}x fp32 ORT's, "
                    f"{best[(name, fastest)][0] / pre:.2f}x the fastest fp32 engine's ({fastest})")
            if (name, "transformers") in best:
                line += f"; decode {tps / best[(name, 'transformers')][1]:.1f}x transformers"
            print(line)
        for fmt in args.quant:  # the best engine of each format (issue 14's targets are per format)
            mine = [lab for lab in qe if lab.endswith(f"-{fmt}") or f"-{fmt}-" in lab]
            lab = max(mine, key=lambda e: best[(name, e)][1])
            print(f"{name:<8} best {fmt}: {lab}, decode {best[(name, lab)][1] / best[(name, top)][1]:.2f}x the best "
                  f"fp32 engine ({top})")
    if qbuilds:
        fp = dir_bytes(work / "build")
        for label, d in qbuilds.items():
            print(f"build directory {label}: {dir_bytes(d) / 1e6:.1f} MB, {dir_bytes(d) / fp:.2f}x fp32's "
                  f"{fp / 1e6:.1f} MB")
    if args.no_memory:
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": rows, "bandwidth": bw}, indent=2))
        return
    del te, ts, oe, od, qe

    label = "nested" if args.nested else args.size or "hybrid-5m"
    mem = {label: memory(nested, work / "build", fam, args.threads, qbuilds, unshared=not args.size,
                         quant_nested=qnested)}
    if not args.nested and not args.size:  # the per-session cost of ONNX Runtime is fixed: show it against bigger weights too
        wide = preset("hybrid-5m", head_order="rank_major", **WIDE)
        wm = build_model(wide, seed=0)
        print(f"wider family: {wm.num_parameters() / 1e6:.1f}M parameters")
        save_nested(work / "wide", wm, bench_family(wide))
        del wm
        build(work / "wide", work / "wide_build", target="onnx")
        mem["wide"] = memory(work / "wide", work / "wide_build", bench_family(wide), args.threads)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "resident": mem, "bandwidth": bw}, indent=2))


if __name__ == "__main__":
    main()
