"""Two budgets in one generation (issue 15), side by side in one run:

(a) budget control on the shipped model's reasoning tasks (short and long): exact match and wall time
    per task for small-only, full-only, small-reason + full-answer, full-reason + small-answer, and
    the cost of a switch (one re-prefill; and with the new budget's prompt prefill kept beforehand);
(b) self-speculative decoding on the shipped model: acceptance and tokens/s against plain full-budget
    decode, per engine (torch, ONNX Runtime), and against transformers' assisted generation with a
    separately loaded small model (the padded 50pct slice);
(c) resident memory (peak RSS of fresh processes): our speculative engine (one weight copy) against our
    plain decode and against two separate models (ours, and transformers' full + small slices);
(d) a random-weight family (--big preset, 50pct = half the heads and FFN, 3/4 of the width): where a
    decode step is weight-bound, the cost of each piece of a round and the speedup they give at the
    acceptance measured in (b), checked against a measured run with draft == verify (acceptance 1).

    nice -n 15 python benchmarks/speculative_bench.py --threads 1 --tasks 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from elastic_export.build import load_family  # noqa: E402
from elastic_export.generate import generate as model_generate  # noqa: E402
from elastic_export.tasks import make_tasks, parse_answer  # noqa: E402
from elastic_export.tokenizer import load_tokenizer  # noqa: E402
from engines.schedule import Phase, scheduled_generate  # noqa: E402
from engines.speculative import speculative_generate  # noqa: E402
from engines.torch_engine import TorchEngine  # noqa: E402

SMALL = "50pct"


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


# ---- (a) budget control ---------------------------------------------------------------------------

def budget_control(eng, tok, n_tasks: int) -> list[dict]:
    nl = tok.encode("\n")[0]
    marker = (tuple(tok.encode("####")),)
    configs = {"small-only": [Phase(SMALL)], "full-only": [Phase("full")],
               "small-reason + full-answer": [Phase(SMALL, until=marker), Phase("full")],
               "full-reason + small-answer": [Phase("full", until=marker), Phase(SMALL)]}
    rows = []
    for variant in ("short", "long"):
        tasks = make_tasks(n_tasks, variant, seed=11)
        for name, phases in configs.items():
            correct, times, sw, sw_kept = 0, [], [], []
            for t in tasks:
                ids = torch.tensor([tok.encode(t.prompt, add_bos=True)])
                n = len(tok.encode(" " + t.steps + " #### 100\n"))
                st = {}
                out, s = timed(lambda: scheduled_generate(eng, ids, n, phases, eos_token_id=nl, stats=st))
                correct += parse_answer(tok.decode(out[0, ids.shape[1]:].tolist())) == t.answer
                times.append(s)
                sw += [x["seconds"] for x in st.get("switches", [])]
                if len(phases) > 1:  # the same generation with the answer budget's prompt prefill kept beforehand
                    cache = {}
                    eng.set_budget(phases[1].budget)
                    eng.prefill(ids, last_only=True)
                    cache[(phases[1].budget, ids.numpy().tobytes(), None)] = eng.snapshot()
                    st2 = {}
                    out2 = scheduled_generate(eng, ids, n, phases, eos_token_id=nl, prompt_cache=cache, stats=st2)
                    assert torch.equal(out2, out)
                    sw_kept += [x["seconds"] for x in st2.get("switches", []) if x["reused_prompt"]]
            rows.append(dict(variant=variant, config=name, exact_match=correct / len(tasks),
                             ms_per_task=1e3 * statistics.mean(times),
                             switch_ms=1e3 * statistics.mean(sw) if sw else None,
                             switch_kept_prompt_ms=1e3 * statistics.mean(sw_kept) if sw_kept else None))
    return rows


# ---- (b) speculative decoding ----------------------------------------------------------------------

def prompts_of(tok, n: int) -> list[torch.Tensor]:
    return [torch.tensor([tok.encode(t.prompt, add_bos=True)]) for t in make_tasks(n, "long", seed=12)]


def spec_rows(eng, prompts, new: int, label: str, ref: dict | None = None) -> list[dict]:
    """Plain full, plain small, speculative (k = 2, 4, auto): tokens/s over all prompts, batch 1."""
    rows = []
    outs = {}
    for name, fn in [("plain full", lambda ids: _plain(eng, "full", ids, new)),
                     (f"plain {SMALL}", lambda ids: _plain(eng, SMALL, ids, new)),
                     *[(f"speculative k={k}", lambda ids, k=k: speculative_generate(
                         eng, ids, new, draft=SMALL, draft_len=k, stats=stats)) for k in (2, 4, "auto")]]:
        stats, acc, total, got = {}, [], 0.0, []
        for ids in prompts:
            out, s = timed(lambda: fn(ids))
            total += s
            got.append(out)
            if "acceptance" in stats:
                acc.append(stats["acceptance"])
        outs[name] = got
        rows.append(dict(engine=label, method=name, tokens_per_s=new * len(prompts) / total,
                         acceptance=statistics.mean(acc) if acc else None,
                         equals_full=all(torch.equal(a, b) for a, b in zip(got, (ref or outs)["plain full"]))))
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_plain_full"] = r["tokens_per_s"] / base
    return rows


def _plain(eng, budget, ids, new):
    eng.set_budget(budget)
    return eng.generate(ids, new)


def hf_assisted(src: Path, prompts, new: int, work: Path) -> list[dict]:
    """transformers: the full slice alone, and assisted by the separately loaded 50pct slice."""
    from transformers import NemotronHForCausalLM

    from elastic_export.nested import load_nested
    from elastic_export.hf_io import save_pretrained

    ck = load_nested(src)
    for n in ("full", SMALL):
        save_pretrained(ck.slice(n, layout="padded"), work / n)
    full = NemotronHForCausalLM.from_pretrained(str(work / "full"), dtype=torch.float32).eval()
    small = NemotronHForCausalLM.from_pretrained(str(work / SMALL), dtype=torch.float32).eval()
    rows, outs = [], {}
    for name, m, kw in [("plain full", full, {}), (f"plain {SMALL} slice", small, {}),
                        (f"assisted by {SMALL} slice", full, {"assistant_model": small})]:
        total, got = 0.0, []
        try:
            for ids in prompts:
                with torch.no_grad():
                    out, s = timed(lambda: m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                                      min_new_tokens=new, do_sample=False, **kw))
                total += s
                got.append(out)
        except ValueError as e:  # transformers 5.x refuses assisted generation for stateful (Mamba) models
            rows.append(dict(engine="transformers", method=name, error=str(e)))
            continue
        outs[name] = got
        rows.append(dict(engine="transformers", method=name, tokens_per_s=new * len(prompts) / total,
                         equals_full=all(torch.equal(a, b) for a, b in zip(got, outs["plain full"]))))
    for r in rows:
        if "tokens_per_s" in r:
            r["vs_plain_full"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows


# ---- (c) memory ------------------------------------------------------------------------------------

def _ours(spec):
    """(model, family) of the shipped model, or of a random --big preset family."""
    if spec.get("preset"):
        from decode_bench import bench_family
        from elastic_export.config import preset
        from elastic_export.model import build_model

        model = build_model(preset(spec["preset"], head_order="rank_major"), seed=0).eval()
        fam = bench_family(model.config)
        return model, {"full": fam["full"], SMALL: fam["small"]}
    model, fam, _ = load_family(spec["path"])
    return model, fam


def memory_worker(spec: dict) -> dict:
    torch.set_num_threads(1)
    from validation.memory import _peak_rss

    ids = torch.tensor([spec["prompt"]])
    mode = spec["mode"]
    if mode == "baseline-ours":  # the same imports, no weights
        from elastic_export.model import build_model  # noqa: F401
    elif mode.startswith("ours"):
        model, fam = _ours(spec)
        eng = TorchEngine(model, fam)
        if mode == "ours-speculative":
            speculative_generate(eng, ids, spec["new"], draft=SMALL)
        else:
            eng.generate(ids, spec["new"])
        if mode == "ours-two-copies":  # a second, separate model of the small budget (its own weights)
            from elastic_export.slicing import slice_budget

            small = slice_budget(model, fam[SMALL]).eval()
            model_generate(small, ids, spec["new"])
    elif mode == "baseline-hf":
        from transformers import NemotronHForCausalLM  # noqa: F401
    else:
        from transformers import NemotronHForCausalLM

        models = [NemotronHForCausalLM.from_pretrained(spec["full"], dtype=torch.float32).eval()]
        if spec.get("small"):  # two checkpoints resident, each serving (assisted generation refuses NemotronH)
            models.append(NemotronHForCausalLM.from_pretrained(spec["small"], dtype=torch.float32).eval())
        with torch.no_grad():
            for m in models:
                m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=spec["new"], do_sample=False)
    return {"rss": _peak_rss()}


def _spawn(spec) -> int:
    code = "import json,sys; sys.path.insert(0, sys.argv[2]); from speculative_bench import memory_worker; " \
           "print(json.dumps(memory_worker(json.loads(sys.argv[1]))))"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}:{ROOT / 'benchmarks'}")
    p = subprocess.run([sys.executable, "-c", code, json.dumps(spec), str(ROOT / "benchmarks")], env=env,
                       capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])["rss"]


def measure_memory(src: Path | None, work: Path | None, prompt: list[int], new: int, preset_name=None) -> dict:
    """Peak RSS (VmHWM, MB) of fresh processes: compare within a kind (ours: plain full decode, speculative,
    plain + a separate small model; transformers: full, full + small), where the imports are the same."""
    base = dict(prompt=prompt, new=new, path=str(src) if src else None, preset=preset_name)
    out = {f"ours: {m}": _spawn({**base, "mode": f"ours-{m}"}) / 1e6 for m in ("plain", "speculative", "two-copies")}
    if work is not None:
        out["transformers: full only"] = _spawn({**base, "mode": "hf", "full": str(work / "full")}) / 1e6
        out["transformers: full + 50pct slice"] = _spawn({**base, "mode": "hf", "full": str(work / "full"),
                                                          "small": str(work / SMALL)}) / 1e6
    return out


# ---- (d) a weight-bound family ---------------------------------------------------------------------

def big_family(preset_name: str, new: int, k: int, acceptances: list[float]) -> dict:
    from decode_bench import bench_family
    from elastic_export.config import preset
    from elastic_export.model import build_model
    from validation.memory import tensor_bytes

    model = build_model(preset(preset_name, head_order="rank_major"), seed=0).eval()
    fam = bench_family(model.config)
    fam = {"full": fam["full"], SMALL: fam["small"]}
    eng = TorchEngine(model, fam)
    ids = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))

    def step_ms(budget, steps=8):
        eng.set_budget(budget)
        eng.prefill(ids, last_only=True)
        tok = torch.zeros(1, dtype=torch.long)
        eng.decode(tok)
        _, s = timed(lambda: [eng.decode(tok) for _ in range(steps)])
        return 1e3 * s / steps

    t_full, t_small = step_ms("full"), step_ms(SMALL)
    eng.set_budget("full")
    eng.prefill(ids, last_only=True)
    ext = torch.zeros(1, k + 1, dtype=torch.long)
    snap = eng.snapshot()
    eng.extend(ext, record=True)  # warm
    eng.restore(snap)
    _, t_verify = timed(lambda: eng.extend(ext, record=True))
    _, t_rewind = timed(lambda: eng.rewind(1))
    t_verify, t_rewind = 1e3 * t_verify, 1e3 * t_rewind
    _, t_plain = timed(lambda: _plain(eng, "full", ids, new))
    fam_self = TorchEngine(model, {"full": fam["full"]})
    st = {}
    _, t_self = timed(lambda: speculative_generate(fam_self, ids, new, draft="full", draft_len=k, stats=st))
    out = dict(preset=preset_name, params_M=model.num_parameters() / 1e6, weights_MB=tensor_bytes(model) / 1e6,
               step_ms_full=t_full, step_ms_small=t_small, small_speedup=t_full / t_small,
               verify_ms=t_verify, rewind_ms=t_rewind, k=k,
               self_draft_measured_tok_s=new / t_self, plain_full_tok_s=new / t_plain,
               self_draft_predicted_tok_s=(k + 1) / (1e-3 * (k * t_full + t_verify)))
    proj = {}
    for a in acceptances:  # expected tokens per round with per-token acceptance a: (1 - a^(k+1)) / (1 - a)
        tokens = (k + 1) if a >= 1 else (1 - a ** (k + 1)) / (1 - a)
        cost = k * t_small + t_verify + (t_rewind if a < 1 else 0.0)
        proj[f"{a:.2f}"] = tokens * t_full / cost
    out["projected_speedup_by_acceptance"] = proj
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tasks", type=int, default=6)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--big", default="hybrid-165m", help="preset for (d); 'none' to skip")
    ap.add_argument("--no-ort", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = {"load_average": os.getloadavg(), "threads": args.threads}
    model, fam, src = load_family(None)
    tok = load_tokenizer(src / "tokenizer")
    eng = TorchEngine(model, fam)
    res["budget_control"] = budget_control(eng, tok, args.tasks)
    prompts = prompts_of(tok, args.tasks)
    res["speculative"] = spec_rows(eng, prompts, args.new, "torch")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.no_ort:
            from elastic_export.build import build
            from engines.ort_engine import OrtEngine

            build(src, work / "onnx", target="onnx")
            res["speculative"] += spec_rows(OrtEngine(work / "onnx", threads=args.threads), prompts, args.new, "ort")
        res["speculative"] += hf_assisted(src, prompts, args.new, work)
        res["memory_net_MB"] = measure_memory(src, work, prompts[0][0].tolist(), args.new)
    acc = [r["acceptance"] for r in res["speculative"] if r.get("acceptance") and r["engine"] == "torch"]
    if args.big != "none":
        res["big"] = big_family(args.big, 16, 4, sorted({0.6, 0.8, round(max(acc), 2), 1.0}))
        res["big"]["memory_net_MB"] = measure_memory(None, None, prompts[0][0].tolist(), 8, preset_name=args.big)
    res["load_average_end"] = os.getloadavg()
    print(json.dumps(res, indent=1, default=float))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=float))


if __name__ == "__main__":
    main()
