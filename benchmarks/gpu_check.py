"""GPU check: correctness of the Triton kernels and the CUDA torch model, then timings side by side
with transformers' NemotronH on the same weights; a table last.

    python benchmarks/gpu_check.py                       # on a GPU (about 2-4 minutes on an H100/H200)
    python benchmarks/gpu_check.py --json out.json       # also write the results as JSON
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --device cpu --tiny   # CPU smoke run (tests)

Checks (each PASS/FAIL; the exit code is 1 when any fails):
  kernels   Triton scan and step vs the float64 torch reference (fp32 and bf16 inputs, both head
            orders, several groups, odd lengths, initial state)
  model     the torch model on the device with the Triton kernels vs the CPU float32 reference
            (prefill logits and 8 cached decode steps); vs transformers on the device (same weights)
  graphs    CUDA-graph greedy decode gives the same tokens as the model's cached decode
  trt       the plugin engine (JIT and AOT) vs the reference, when tensorrt is importable
Timings (medians; ratios are "ours faster by"):
  scan      Triton SSD scan vs transformers' torch scan (mamba2_chunk_scan), and the fraction of the
            bandwidth floor (bytes it must move / measured copy bandwidth) it reaches
  prefill   model prefill, ours (Triton) vs transformers
  decode    greedy decode per token: ours with CUDA graphs, ours eager, transformers' cached generate
Targets (issue 6): scan >= 3x transformers, >= 50% of the floor; decode with graphs >= 5x.
Never a timed assertion: targets are reported, not enforced.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu only for a smoke run under TRITON_INTERPRET=1 (with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (CPU smoke run)")
    p.add_argument("--budget-s", type=float, default=450.0, help="skip remaining timings past this many seconds")
    p.add_argument("--preset", default="hybrid-165m", help="model preset for the timings")
    p.add_argument("--prefill-len", type=int, default=2048)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--scan-shape", default="2,4096,128,80,8,128",
                   help="b,l,h,p,g,n of the timed scan (default: a Nemotron Nano V2 12B Mamba layer)")
    p.add_argument("--only", default="", help="comma-separated sections to run (kernels, model, transformers, "
                   "graphs, trt, scan, timing); default all")
    p.add_argument("--json", type=Path, help="write the results here")
    return p.parse_args(argv)


class Report:
    def __init__(self, budget_s):
        self.t0 = time.time()
        self.budget_s = budget_s
        self.checks = []  # (name, ok, detail)
        self.timings = []  # (name, ours, theirs, ratio, target, note)
        self.notes = []

    def elapsed(self):
        return time.time() - self.t0

    def over_budget(self):
        return self.elapsed() > self.budget_s

    def check(self, name, ok, detail=""):
        self.checks.append((name, bool(ok), detail))
        print(f"[{self.elapsed():6.1f}s] {'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)

    def time(self, name, ours, theirs, ratio, target, note=""):
        self.timings.append((name, ours, theirs, ratio, target, note))
        print(f"[{self.elapsed():6.1f}s] time {name}: {ours} vs {theirs} -> {ratio} (target {target}) {note}",
              flush=True)

    def section(self, name, fn, *args):
        try:
            fn(self, *args)
        except Exception as e:  # record and continue: one broken section must not hide the others
            traceback.print_exc()
            self.check(f"{name} (section crashed)", False, f"{type(e).__name__}: {e}")

    def table(self):
        lines = ["", "=" * 100, "GPU check results", "=" * 100]
        w = max([len(c[0]) for c in self.checks] + [10])
        for name, ok, detail in self.checks:
            lines.append(f"{'PASS' if ok else 'FAIL'}  {name:<{w}}  {detail}")
        if self.timings:
            lines.append("-" * 100)
            lines.append(f"{'timing':<34} {'ours':>16} {'reference':>16} {'ratio':>10} {'target':>8}  note")
            for name, ours, theirs, ratio, target, note in self.timings:
                lines.append(f"{name:<34} {ours:>16} {theirs:>16} {ratio:>10} {target:>8}  {note}")
        for n in self.notes:
            lines.append(f"note: {n}")
        ok = all(c[1] for c in self.checks)
        lines.append(f"{sum(c[1] for c in self.checks)}/{len(self.checks)} checks passed; "
                     f"{self.elapsed():.0f} s")
        lines.append("=" * 100)
        print("\n".join(lines), flush=True)
        return ok

    def to_json(self):
        return {"checks": [dict(name=n, ok=o, detail=d) for n, o, d in self.checks],
                "timings": [dict(name=n, ours=a, reference=b, ratio=r, target=t, note=nt)
                            for n, a, b, r, t, nt in self.timings],
                "notes": self.notes, "seconds": round(self.elapsed(), 1)}


# ---- helpers -------------------------------------------------------------------------------------

def sync(dev):
    import torch
    if dev == "cuda":
        torch.cuda.synchronize()


def bench(fn, dev, warmup=2, iters=5):
    """Median seconds of fn()."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def scan_inputs(b, l, h, p, g, n, dtype, dev, seed=0):
    import torch
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen).to(dtype)
    dt = torch.rand(b, l, h, generator=gen) * 0.1 + 0.001
    A = -torch.exp(torch.rand(h, generator=gen) * 2)
    B = torch.randn(b, l, g, n, generator=gen).to(dtype)
    C = torch.randn(b, l, g, n, generator=gen).to(dtype)
    s0 = torch.randn(b, h, p, n, generator=gen)
    return [t.to(dev) for t in (x, dt, A, B, C, s0)]


def rel_err(got, want):
    got, want = got.double().cpu(), want.double().cpu()
    return (got - want).abs().max().item() / (want.abs().max().item() + 1e-6)


def ms(s):
    return f"{s * 1e3:.3f} ms"


# ---- checks --------------------------------------------------------------------------------------

def check_kernels(R, dev, tiny):
    import torch

    from elastic_export import ssd
    from engines.kernels import ssd_triton as K

    cases = [(2, 37, 6, 10, 2, 12, 16), (3, 5, 4, 20, 4, 24, 64)]
    if not tiny:
        cases += [(1, 50, 9, 6, 3, 8, 8), (2, 1000, 32, 80, 4, 128, 128), (1, 777, 16, 64, 2, 64, 256)]
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-3)):
        for order in ("group_contiguous", "rank_major"):
            worst = 0.0
            for (b, l, h, p, g, n, cs) in cases:
                x, dt, A, B, C, s0 = scan_inputs(b, l, h, p, g, n, dtype, dev, seed=l)
                y, f = K.ssd_chunked(x, dt, A, B, C, cs, s0, order)
                yr, fr = ssd.ssd_chunked(*(t.double() for t in (x, dt, A, B, C)), cs, s0.double(), order)
                worst = max(worst, rel_err(y, yr), rel_err(f, fr))
                ys, ss = K.ssd_step(s0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], order)
                yq, sq = ssd.ssd_step(s0, x[:, 0].float(), dt[:, 0], A, B[:, 0].float(), C[:, 0].float(), order)
                worst = max(worst, rel_err(ys, yq), rel_err(ss, sq))
            R.check(f"kernels {str(dtype)[6:]} {order}", worst <= tol, f"max rel err {worst:.2e} (tol {tol:g})")


def build_small(preset_name, dev, order="group_contiguous", seed=0):
    import torch

    from elastic_export.config import preset
    from elastic_export.model import build_model
    cfg = preset(preset_name, head_order=order)
    model = build_model(cfg, seed=seed).eval()
    with torch.no_grad():  # livelier weights than the init: every head and norm differs
        gen = torch.Generator().manual_seed(seed)
        for name, prm in model.named_parameters():
            if name.endswith(("norm.weight", ".D")):
                prm.copy_(1 + 0.2 * torch.randn(prm.shape, generator=gen))
    return model.to(dev)


def check_model(R, dev, tiny):
    import torch

    from engines.kernels import disable_triton_kernels, enable_triton_kernels
    from elastic_export.generate import generate

    for order in ("group_contiguous", "rank_major"):
        ref = build_small("hybrid-5m", "cpu", order)
        model = build_small("hybrid-5m", "cpu", order).to(dev)
        L = 70 if tiny else 300
        ids = torch.randint(0, ref.config.vocab_size, (2, L), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want = ref(ids)
            cache = ref.new_cache()
            ref(ids[:, :-8], cache=cache)
            want_steps = [ref(ids[:, t:t + 1], cache=cache) for t in range(L - 8, L)]
            enable_triton_kernels((dev,))
            try:
                got = model(ids.to(dev))
                cache = model.new_cache()
                model(ids[:, :-8].to(dev), cache=cache)
                got_steps = [model(ids[:, t:t + 1].to(dev), cache=cache) for t in range(L - 8, L)]
                toks = generate(model, ids[:, :20].to(dev), 12)
            finally:
                disable_triton_kernels()
            want_toks = generate(ref, ids[:, :20], 12)
        e1 = rel_err(got, want)
        e2 = max(rel_err(g, w) for g, w in zip(got_steps, want_steps))
        R.check(f"model {dev} (Triton) vs CPU reference, {order}", e1 <= 1e-3 and e2 <= 1e-3,
                f"prefill rel err {e1:.2e}, decode {e2:.2e} (tol 1e-3)")
        R.check(f"model {dev} greedy tokens vs CPU, {order}", torch.equal(toks.cpu(), want_toks))


def load_hf(model, dtype, dev, tmp):
    import torch
    from transformers import NemotronHForCausalLM as HF

    path = Path(tmp) / f"hf-{model.config.hidden_size}-{str(dtype)[6:]}"
    if not path.exists():
        model.save_pretrained(path, dtype=dtype)
    hf = HF.from_pretrained(str(path), dtype=dtype).to(dev).eval()
    hf.generation_config.pad_token_id = 0
    return hf


def check_vs_transformers(R, dev, tiny, tmp):
    import torch

    model = build_small("hybrid-5m", dev)
    hf = load_hf(model, torch.float32, dev, tmp)
    ids = torch.randint(0, model.config.vocab_size, (1, 64 if tiny else 256), device=dev)
    from engines.kernels import disable_triton_kernels, enable_triton_kernels
    enable_triton_kernels((dev,))
    try:
        with torch.no_grad():
            e = rel_err(model(ids), hf(ids).logits)
    finally:
        disable_triton_kernels()
    R.check(f"model {dev} (Triton) vs transformers {dev}, same weights", e <= 1e-3, f"rel err {e:.2e}")


def check_graphs(R, dev, tiny):
    import torch

    from elastic_export.generate import generate
    from engines.cuda_graph_decode import GraphDecoder
    from engines.kernels import disable_triton_kernels, enable_triton_kernels

    model = build_small("hybrid-5m", dev, "rank_major")
    ids = torch.randint(0, model.config.vocab_size, (2, 33), device=dev)
    enable_triton_kernels((dev,))
    try:
        want = generate(model, ids, 16)
        got = GraphDecoder(model, batch=2, max_len=64).generate(ids, 16)
    finally:
        disable_triton_kernels()
    R.check(f"decode {'CUDA graph' if dev == 'cuda' else 'static step'} tokens vs cached decode",
            torch.equal(got, want))


# ---- timings -------------------------------------------------------------------------------------

def copy_bandwidth(dev, tiny):
    import torch
    n = (1 << 20) if tiny else (1 << 28)  # floats: 4 MiB / 1 GiB
    a = torch.empty(n, device=dev)
    b = torch.empty_like(a)
    s = bench(lambda: b.copy_(a), dev, 2, 5)
    return 2 * a.numel() * 4 / s  # bytes read + written per second


def time_scan(R, dev, tiny, shape):
    import torch
    import transformers.models.nemotron_h.modeling_nemotron_h as hfm

    from engines.kernels import ssd_triton as K
    b, l, h, p, g, n = (1, 256, 8, 80, 2, 64) if tiny else shape
    x, dt, A, B, C, s0 = scan_inputs(b, l, h, p, g, n, torch.bfloat16, dev)
    bw = copy_bandwidth(dev, tiny)
    floor_bytes = (x.numel() * 2 + dt.numel() * 4 + (B.numel() + C.numel()) * 2 + s0.numel() * 4
                   + x.numel() * 4 + s0.numel() * 4)  # read x, dt, B, C, s0; write y (fp32), final
    floor = floor_bytes / bw
    default = (K.block_l(128), K.block_p(p), K.num_warps(K.block_l(128), K.block_p(p), K.block_n(n)), K.DOT_TF32)
    low = K.DOT_LOW
    configs = [default] if tiny else [default, (16, 16, 4, 1), (32, 16, 4, 1), (64, 16, 8, 1), (32, 32, 4, 1),
                                      (64, 32, 8, 1), (32, 64, 8, 1), (64, 128, 8, 1), (16, 16, 4, low),
                                      (32, 16, 4, low), (64, 16, 4, low), (64, 16, 8, low), (32, 32, 4, low),
                                      (64, 32, 8, low), (64, 128, 8, low)]
    yr, fr = K.ssd_chunked(x.float(), dt, A, B.float(), C.float(), 128, s0, "group_contiguous")  # fp32 IEEE
    best, s_default = None, None
    for cfg in dict.fromkeys(configs):  # (block_l, block_p, num_warps, dot), default first
        if R.over_budget():
            break
        try:
            s = bench(lambda: K.ssd_chunked(x, dt, A, B, C, 128, s0, "group_contiguous", config=cfg), dev, 2, 5)
            y, f = K.ssd_chunked(x, dt, A, B, C, 128, s0, "group_contiguous", config=cfg)
            err = max(rel_err(y, yr), rel_err(f, fr))
        except Exception as e:  # e.g. out of registers or shared memory for this config
            R.notes.append(f"scan config {cfg} failed: {type(e).__name__}: {str(e)[:120]}")
            continue
        s_default = s if s_default is None else s_default
        R.notes.append(f"scan config (block_l, block_p, warps, dot {'tf32' if cfg[3] == 1 else 'low'})={cfg[:3]}: "
                       f"{ms(s)}, rel err vs fp32 {err:.1e}")
        if best is None or s < best[0]:
            best = (s, cfg)
    hf_scan = getattr(hfm.mamba2_chunk_scan, "__wrapped__", hfm.mamba2_chunk_scan)
    s_hf = bench(lambda: hf_scan(x, dt, A, B, C, 128, initial_states=s0, return_final_states=True), dev, 1, 3)
    R.notes.append(f"scan shape b,l,h,p,g,n = {b},{l},{h},{p},{g},{n}, bf16 inputs; copy bandwidth "
                   f"{bw / 1e9:.0f} GB/s; floor {floor_bytes / 1e6:.0f} MB -> {ms(floor)}")
    R.time("scan: Triton vs transformers torch", ms(best[0]), ms(s_hf), f"{s_hf / best[0]:.1f}x", ">=3x",
           f"best config {best[1]}; default {ms(s_default)}")
    R.time("scan: Triton vs bandwidth floor", ms(best[0]), ms(floor), f"{floor / best[0]:.0%}", ">=50%")


def time_model(R, dev, tiny, args, tmp):
    import torch

    from elastic_export.generate import generate
    from engines.cuda_graph_decode import GraphDecoder
    from engines.kernels import disable_triton_kernels, enable_triton_kernels

    preset_name = "hybrid-5m" if tiny else args.preset
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    L = 64 if tiny else args.prefill_len
    N = 8 if tiny else args.decode_tokens
    model = build_small(preset_name, "cpu").to(dtype).to(dev)
    hf = load_hf(model, dtype, dev, tmp)
    ids = torch.randint(0, model.config.vocab_size, (1, L), device=dev)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    R.notes.append(f"model {preset_name}: {sum(t.numel() for t in model.parameters()) / 1e6:.1f}M parameters, "
                   f"{str(dtype)[6:]}, prefill {L} tokens, decode {N} tokens, batch 1")

    enable_triton_kernels((dev,))
    try:
        with torch.no_grad():
            s_ours = bench(lambda: model(ids, last_only=True), dev, 2, 5)
            try:
                s_hf = bench(lambda: hf(ids, logits_to_keep=1), dev, 1, 3)
            except TypeError:
                s_hf = bench(lambda: hf(ids), dev, 1, 3)
        R.time("prefill: ours (Triton) vs transformers", ms(s_ours), ms(s_hf), f"{s_hf / s_ours:.1f}x", "-",
               f"{L / s_ours:,.0f} tok/s")
        if R.over_budget():
            R.notes.append("decode timings skipped: over the time budget")
            return

        dec = GraphDecoder(model, batch=1, max_len=L + N + 8)
        dec.prefill(ids)
        dec.step()  # capture (graphs) or warm up

        def graph_decode():
            dec.prefill(ids)
            for _ in range(N):
                dec.step()

        s_prefill_only = bench(lambda: dec.prefill(ids), dev, 1, 3)
        s_graph = (bench(graph_decode, dev, 1, 3) - s_prefill_only) / N
        with torch.no_grad():
            s_eager = (bench(lambda: generate(model, ids, N + 1), dev, 1, 3)
                       - bench(lambda: generate(model, ids, 1), dev, 1, 3)) / N
    finally:
        disable_triton_kernels()

    def hf_gen(k):
        with torch.no_grad():
            return hf.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False)

    s_hf_dec = (bench(lambda: hf_gen(N + 1), dev, 1, 3) - bench(lambda: hf_gen(1), dev, 1, 3)) / N
    floor = weight_bytes / copy_bandwidth(dev, tiny)
    label = "CUDA graphs" if dev == "cuda" else "static step"
    R.time(f"decode: ours ({label}) vs transformers", ms(s_graph), ms(s_hf_dec), f"{s_hf_dec / s_graph:.1f}x",
           ">=5x", f"{1 / s_graph:,.0f} tok/s; weights floor {ms(floor)}")
    R.time("decode: ours eager vs transformers", ms(s_eager), ms(s_hf_dec), f"{s_hf_dec / s_eager:.1f}x", "-",
           f"{1 / s_eager:,.0f} tok/s")


def check_trt(R, dev, tmp):
    import engines.trt as etrt
    ok, reason = etrt.availability()
    if not ok:
        R.notes.append(f"TensorRT checks skipped: {reason}")
        return
    import torch
    import onnx
    from onnx import TensorProto, helper

    import tensorrt as trt

    from elastic_export import plugin_spec as spec
    from elastic_export import ssd
    from engines.trt.builder import build_engine
    from engines.trt.engine import _torch_dtype

    b, l, h, p, g, n = 2, 300, 16, 80, 4, 128
    dims = {"x": ["b", "l", h, p], "dt": ["b", "l", h], "A": [h], "B": ["b", "l", g, n], "C": ["b", "l", g, n],
            "initial_state": ["b", h, p, n], "y": ["b", "l", h, p], "final_state": ["b", h, p, n]}
    types_ = {k: TensorProto.BFLOAT16 if k in ("x", "B", "C") else TensorProto.FLOAT for k in dims}
    x, dt, A, B, C, s0 = scan_inputs(b, l, h, p, g, n, torch.bfloat16, "cuda")
    yr, fr = ssd.ssd_chunked(x, dt, A, B, C, 128, s0, "rank_major")
    for aot in (False, True):
        node = spec.make_node(spec.INPUTS, spec.OUTPUTS, 128, "rank_major", aot=aot)
        vi = lambda k: helper.make_tensor_value_info(k, types_[k], dims[k])  # noqa: E731
        graph = helper.make_graph([node], "ssd", [vi(i) for i in spec.INPUTS], [vi(o) for o in spec.OUTPUTS])
        path = Path(tmp) / f"ssd_{aot}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                          helper.make_opsetid(spec.ONNX_DOMAIN, 1)]), path)
        info = build_engine(path, Path(tmp) / f"ssd_{aot}.engine", {"p": {"b": (1, 2, 4), "l": (1, 300, 4096)}},
                            timing_cache=Path(tmp) / "timing.cache")
        rt = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        eng = rt.deserialize_cuda_engine((Path(tmp) / f"ssd_{aot}.engine").read_bytes())
        ctx = eng.create_execution_context()
        feeds = dict(zip(spec.INPUTS, (x, dt, A, B, C, s0)))
        for k, t in feeds.items():
            ctx.set_input_shape(k, tuple(t.shape))
            ctx.set_tensor_address(k, t.data_ptr())
        outs = {}
        for k in spec.OUTPUTS:
            outs[k] = torch.empty(tuple(ctx.get_tensor_shape(k)), dtype=_torch_dtype(eng.get_tensor_dtype(k)),
                                  device="cuda")
            ctx.set_tensor_address(k, outs[k].data_ptr())
        stream = torch.cuda.current_stream().cuda_stream
        ctx.execute_async_v3(stream)
        torch.cuda.synchronize()
        e = max(rel_err(outs["y"], yr), rel_err(outs["final_state"], fr))
        R.check(f"TensorRT plugin engine ({'AOT' if aot else 'JIT'}) vs reference", e <= 5e-3,
                f"rel err {e:.2e}; engine {info['bytes']} bytes, built in {info['build_seconds']} s")
        s = bench(lambda: ctx.execute_async_v3(stream), "cuda", 2, 10)
        R.notes.append(f"TensorRT plugin ({'AOT' if aot else 'JIT'}) scan b,l,h,p,g,n={b},{l},{h},{p},{g},{n}: {ms(s)}")


# ---- main ----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        args.scan_shape = tuple(int(v) for v in args.scan_shape.split(","))
        assert len(args.scan_shape) == 6
    except (ValueError, AssertionError):
        print(f"gpu_check: --scan-shape wants six integers b,l,h,p,g,n, got {args.scan_shape!r}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import torch

    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible to torch; run it on a GPU machine "
              "(or: TRITON_INTERPRET=1 python benchmarks/gpu_check.py --device cpu --tiny)", file=sys.stderr)
        return 2
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("gpu_check: --device cpu needs TRITON_INTERPRET=1 in the environment", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except Exception as e:
        print(f"gpu_check: triton is not importable ({e})", file=sys.stderr)
        return 2

    R = Report(args.budget_s)
    if dev == "cuda":
        R.notes.append(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
                       f"triton {triton.__version__}")
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    want = lambda name: not only or name in only  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn, extra in (("kernels", check_kernels, (args.tiny,)), ("model", check_model, (args.tiny,)),
                                ("transformers", check_vs_transformers, (args.tiny, tmp)),
                                ("graphs", check_graphs, (args.tiny,))):
            if want(name):
                R.section(name, fn, dev, *extra)
        if dev == "cuda" and want("trt"):
            R.section("trt", check_trt, dev, tmp)
        for name, fn, extra in (("scan", time_scan, (args.scan_shape,)), ("timing", time_model, (args, tmp))):
            if not want(name):
                continue
            if R.over_budget():
                R.notes.append(f"{name} timings skipped: over the {args.budget_s:.0f} s budget")
                continue
            R.section(name, fn, dev, args.tiny, *extra)
    ok = R.table()
    if args.json:
        args.json.write_text(json.dumps(R.to_json(), indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
