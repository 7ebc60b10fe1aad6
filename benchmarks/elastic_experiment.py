"""Issue 10 experiment: are the nested budgets as good as separately distilled ones, and why (not)?

From one pretrained parent, per seed (the seed sets the data order, the calibration windows, the
router's initialization and its noise):

  N    nested, our recipe: stage 1 sandwich (every budget each step, one shared teacher forward; the
       router learns), router frozen after stage 1 (repaired into each budget's band, budgets nested in
       each other), stage 2 sandwich with loss weights 0.5 / 0.3 / 0.2 on longer sequences
  Nu   N branched after stage 1, stage 2 with equal loss weights                         -> (e)
  P    the paper's sampling (one budget per step: uniform, then weighted 0.5 / 0.3 / 0.2), the same
       router settings, given as much compute as N (forward equivalents, see below)      -> (c)
  S    each smaller budget with N's architecture, pruned from the same sorted parent and distilled
       alone, as many tokens as the whole run N (= N's steps for that budget)             -> (a), (b)
  S'   each smaller budget with P's architecture, alone, as many steps as P gave it       -> (b)

(d) is N after stage 1 against N after stage 2 on the long tasks. Compute is counted in full-model
forward equivalents per step: one teacher forward plus 3 x (a budget's parameter share) for each
student forward + backward; P's token counts are scaled so that its total matches N's.

    python benchmarks/elastic_experiment.py --parent runs/exp_parent_src --seeds 0 1 2 --jobs 2
    python benchmarks/elastic_experiment.py --quick              # a smoke run with tiny token counts
    python benchmarks/elastic_experiment.py --report-only        # re-aggregate OUT/seed*/results.json

``--parent`` is a training-state directory (``state.safetensors`` + ``state.json`` of a pretraining run, e.g. ``runs/default/checkpoint``
copied at some step) or an HF checkpoint directory.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training import checkpoint as ckpt  # noqa: E402
from training.data import build_mixture  # noqa: E402
from training.distill import kd_loss  # noqa: E402
from training.recipe import load_recipe, parent_config, validate_recipe  # noqa: E402
from training.trainer import evaluate_budgets, lr_factor, plan_stages, train  # noqa: E402

SMALL = ("75pct", "50pct")
# elastic stages of every arm (a shortened paper curriculum at the default model's scale; see RESULTS.md)
STAGES = {"stage1": dict(steps=40, seq_len=256, batch_size=8), "stage2": dict(steps=24, seq_len=512, batch_size=4)}


def make_parent(src: Path, base: dict, dest: Path) -> None:
    """An HF checkpoint of the parent from a training state (checkpoint directory) or an HF directory."""
    from elastic_export.model import NemotronHForCausalLM

    if (src / "config.json").is_file():
        shutil.copytree(src, dest, dirs_exist_ok=True)
        return
    state = ckpt.load_state(src)
    if state is None:
        raise SystemExit(f"{src} holds no training state: give a pretraining checkpoint or an HF checkpoint")
    with torch.device("meta"):
        model = NemotronHForCausalLM(parent_config(base).replace(head_order=state.get("head_order", "rank_major")))
    model.load_state_dict(state["model"], assign=True)
    model.save_pretrained(dest)


def arm_recipe(base: dict, parent: Path, out: Path, seed: int, quick: bool, sampling: str,
               stage2_weights, scale: float = 1.0, freeze: str = "stage1") -> dict:
    r = copy.deepcopy(base)
    r.update(seed=seed, out=str(out))
    r["model"]["init"] = str(parent)
    r["model"].pop("config", None)
    r["output"] = {"dtype": "float32"}
    r["router"].update(warmup_steps=10, freeze_after=freeze, nested=True, repair=True, budget_cost="expected")
    stages = []
    for s in (s for s in base["stages"] if s["kind"] == "elastic"):
        g = STAGES[s["name"]]
        steps = 3 if quick else max(1, round(g["steps"] * scale))
        s = {**s, "seq_len": g["seq_len"], "batch_size": g["batch_size"], "tokens": steps * g["batch_size"] * g["seq_len"],
             "warmup_steps": min(s["warmup_steps"], 10)}
        if s["name"] == "stage1":
            s.update(sampling=sampling, weights=None)
        else:
            s.update(sampling=sampling if stage2_weights is None or sampling == "sandwich" else "weighted",
                     weights=stage2_weights)
        stages.append(s)
    r["stages"] = stages
    r["train"].update(progress=False, checkpoint_every=10**6, threads=1, log_every=1)
    r["data"].update(eval_tasks=10 if quick else 100, eval_windows=4 if quick else 16)
    return validate_recipe(r, base=ROOT)


def sorted_parent(run: Path, cfg):
    """The importance-sorted parent an elastic run started from (its frozen teacher)."""
    from elastic_export.model import NemotronHForCausalLM

    state = ckpt.load_state(run / "teacher")
    with torch.device("meta"):
        model = NemotronHForCausalLM(cfg.replace(head_order=state.get("head_order", "rank_major")))
    model.load_state_dict(state["model"], assign=True)
    return model


def separate_run(r: dict, run: Path, subnet, name: str, stage_steps: list[int]) -> dict:
    """Prune the sorted parent of ``run`` to ``subnet`` and distill it alone from the parent: the run's
    data windows and schedule, ``stage_steps[i]`` steps in stage i."""
    from elastic_export.tokenizer import ByteTokenizer

    torch.manual_seed(r["seed"])
    cfg = parent_config(r)
    teacher, student = sorted_parent(run, cfg).eval(), sorted_parent(run, cfg).train()
    mixture = build_mixture(r["data"], ByteTokenizer(), r["seed"])
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    t0, tokens, steps = time.time(), 0, 0
    for st, n in zip(plan_stages(r["stages"]), stage_steps):
        s = st.spec
        for local in range(n):
            for g in opt.param_groups:
                g["lr"] = s["lr"] * lr_factor(local, n, min(s["warmup_steps"], n), s["min_lr_ratio"])
            first = st.window_offset + local * s["batch_size"]
            x = mixture.batch(range(first, first + s["batch_size"]), s["seq_len"])[:, :-1]
            with torch.no_grad():
                t_logits = teacher(x)
            loss = kd_loss(student(x, subnet=subnet), t_logits, r["distill"]["temperature"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), r["train"]["grad_clip"])
            opt.step()
            tokens += s["batch_size"] * s["seq_len"]
            steps += 1
    seq = max(s["seq_len"] for s in r["stages"])  # as the trainer's evaluations
    ev = evaluate_budgets(student, {name: subnet}, mixture, ByteTokenizer(), seq, r["data"]["eval_windows"],
                          r["data"]["eval_tasks"], r["seed"], r["train"]["eval_batch_size"])["budgets"][name]
    from elastic_export.accounting import count_params

    share = count_params(cfg, subnet) / count_params(cfg)
    ev.update(tokens=tokens, steps=steps, seconds=time.time() - t0, forwards=steps * (1 + 3 * share))
    return ev


def run_record(out: Path) -> dict:
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    evals = [x for x in recs if x.get("event") == "eval"]
    steps = [x for x in recs if "forwards" in x]
    manifest = json.loads((out / "nested" / "elastic.json").read_text()) if (out / "nested").is_dir() else None
    subnets = {}
    if manifest:
        from elastic_export.nested import read_manifest

        subnets = {n: s.to_dict() for n, s in read_manifest(out / "nested")[2].items()}
    frozen = next((x["budgets"] for x in recs if x.get("event") == "router_frozen"), None)
    return {"evals": {e["stage"]: e["budgets"] for e in evals}, "frozen": frozen,
            "forwards": sum(x["forwards"] for x in steps) * (1 if len(steps) == _steps(manifest) else math.nan),
            "seconds": steps[-1]["elapsed"] if steps else None,
            "stages": manifest["training"]["stages"] if manifest else None,
            "budgets": {b["name"]: {**b, "subnet": subnets[b["name"]]} for b in manifest["budgets"]} if manifest else None}


def _steps(manifest) -> int:
    return manifest["training"]["steps"] if manifest else -1


def one_seed(base: dict, parent: Path, out: Path, seed: int, quick: bool) -> dict:
    from elastic_export.elastic import Subnet

    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    # N and its branch Nu (stage 2 with equal weights)
    rn = arm_recipe(base, parent, out / "N", seed, quick, "sandwich", [0.5, 0.3, 0.2])
    s1_end = plan_stages(rn["stages"])[0].end
    for d in ("N", "Nu"):
        shutil.rmtree(out / d, ignore_errors=True)
    rn["train"]["checkpoint_every"] = s1_end
    train(rn, resume=False, stop_after_step=s1_end)
    shutil.copytree(out / "N", out / "Nu")
    train(rn)
    # F: no router, architectures from the importance search at the elastic start, trained as N
    rf = arm_recipe(base, parent, out / "F", seed, quick, "sandwich", [0.5, 0.3, 0.2], freeze="start")
    shutil.rmtree(out / "F", ignore_errors=True)
    train(rf, resume=False)
    F = run_record(out / "F")
    ru = arm_recipe(base, parent, out / "Nu", seed, quick, "sandwich", None)
    ru["train"]["checkpoint_every"] = s1_end
    train(ru)
    N, Nu = run_record(out / "N"), run_record(out / "Nu")
    # P at N's compute: its per-step forwards, expected from N's frozen shares, set its token counts
    shares = {n: b["params"] / N["budgets"]["full"]["params"] for n, b in N["budgets"].items()}
    per_step_p = [1 + 3 * sum(shares.values()) / len(shares),
                  1 + 3 * sum(w * shares[n] for w, n in zip([0.5, 0.3, 0.2], ["full", *SMALL]))]
    n_steps = [st.steps for st in plan_stages(rn["stages"])]
    per_step_n = 1 + 3 * sum(shares.values())
    scale = per_step_n * sum(n_steps) / sum(p * n for p, n in zip(per_step_p, n_steps))
    rp = arm_recipe(base, parent, out / "P", seed, quick, "uniform", [0.5, 0.3, 0.2], scale=scale)
    shutil.rmtree(out / "P", ignore_errors=True)
    train(rp, resume=False)
    P = run_record(out / "P")
    # S: N's architectures, N's steps; S': P's architectures, P's per-budget steps; SF: F's, F's steps
    S, S2, SF = {}, {}, {}
    for name in SMALL:
        S[name] = separate_run(rn, out / "N", Subnet.from_dict(N["budgets"][name]["subnet"]), name, n_steps)
        SF[name] = separate_run(rf, out / "F", Subnet.from_dict(F["budgets"][name]["subnet"]), name, n_steps)
        counts = [st["steps_per_budget"][name] for st in P["stages"] if st["kind"] == "elastic"]
        S2[name] = separate_run(rp, out / "P", Subnet.from_dict(P["budgets"][name]["subnet"]), name, counts)
    from elastic_export.tokenizer import ByteTokenizer
    from elastic_export.elastic import full_subnet

    cfg = parent_config(rn)
    mixture = build_mixture(rn["data"], ByteTokenizer(), seed)
    seq = max(s["seq_len"] for s in rn["stages"])
    parent_eval = evaluate_budgets(sorted_parent(out / "N", cfg), {"full": full_subnet(cfg)}, mixture, ByteTokenizer(),
                                   seq, rn["data"]["eval_windows"], rn["data"]["eval_tasks"], seed,
                                   rn["train"]["eval_batch_size"])["budgets"]["full"]
    res = {"seed": seed, "quick": quick, "parent": parent_eval, "N": N, "Nu": Nu, "P": P, "F": F, "S": S, "S_steps": S2, "S_F": SF,
           "tokens": {"N": sum(st.steps * st.spec["batch_size"] * st.spec["seq_len"] for st in plan_stages(rn["stages"])),
                      "P": sum(st.steps * st.spec["batch_size"] * st.spec["seq_len"] for st in plan_stages(rp["stages"]))},
           "p_scale": scale, "seconds": time.time() - t0}
    (out / "results.json").write_text(json.dumps(res, indent=2))
    return res


# ---- aggregation --------------------------------------------------------------------------------

def _ms(vals):
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    sd = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
    return m, sd


def fmt(vals, digits=3, pct=False):
    m, sd = _ms(vals)
    if pct:
        return f"{100 * m:.1f} ± {100 * sd:.1f}"
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def table(results: list[dict]) -> str:
    """Markdown tables (mean ± std over seeds) for RESULTS.md."""
    def ev(res, arm, stage, name, key):
        return res[arm]["evals"][stage][name][key]

    rows = ["| model | params (share) | held-out loss | answer loss short | answer loss long | exact short | exact long | tokens | forwards |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def row(label, get, share=None, tokens=None, forwards=None):
        vals = {k: [get(r, k) for r in results] for k in
                ("held_out_loss", "answer_loss_short", "answer_loss_long", "acc_short", "acc_long")}
        rows.append(f"| {label} | {share or ''} | {fmt(vals['held_out_loss'])} | {fmt(vals['answer_loss_short'])} | "
                    f"{fmt(vals['answer_loss_long'])} | {fmt(vals['acc_short'], pct=True)}% | "
                    f"{fmt(vals['acc_long'], pct=True)}% | {tokens or ''} | {forwards or ''} |")

    def share(arm, name):
        return fmt([r[arm]["budgets"][name]["params"] / r[arm]["budgets"]["full"]["params"] for r in results], pct=True) + "%"

    tok = {a: f"{_ms([r['tokens'][a] for r in results])[0] / 1e3:.0f}k" for a in ("N", "P")}
    fw = {a: f"{_ms([r[a]['forwards'] for r in results])[0]:.0f}" for a in ("N", "P")}
    row("parent (sorted)", lambda r, k: r["parent"][k], "100%")
    for stage, label in (("stage1", "N after stage 1"), ("stage2", "N after stage 2")):
        for n in ("full", *SMALL):
            row(f"{label}: {n}", lambda r, k, n=n, s=stage: ev(r, "N", s, n, k), share("N", n) if n != "full" else "100%",
                tok["N"] if stage == "stage2" else None, fw["N"] if stage == "stage2" and n == "full" else None)
    for n in ("full", *SMALL):
        row(f"Nu (stage 2 equal weights): {n}", lambda r, k, n=n: ev(r, "Nu", "stage2", n, k),
            share("Nu", n) if n != "full" else "100%")
    for n in ("full", *SMALL):
        row(f"P (one budget per step, N's compute): {n}", lambda r, k, n=n: ev(r, "P", "stage2", n, k),
            share("P", n) if n != "full" else "100%", tok["P"] if n == "full" else None,
            fw["P"] if n == "full" else None)
    for n in ("full", *SMALL):
        row(f"F (no router: importance search, sandwich): {n}", lambda r, k, n=n: ev(r, "F", "stage2", n, k),
            share("F", n) if n != "full" else "100%")
    for n in SMALL:
        row(f"SF separate, F's architecture and tokens: {n}", lambda r, k, n=n: r["S_F"][n][k], share("F", n))
    for n in SMALL:
        row(f"S separate, N's architecture and tokens: {n}", lambda r, k, n=n: r["S"][n][k], share("N", n),
            f"{_ms([r['S'][n]['tokens'] for r in results])[0] / 1e3:.0f}k",
            f"{_ms([r['S'][n]['forwards'] for r in results])[0]:.0f}")
    for n in SMALL:
        row(f"S' separate, P's architecture and per-budget steps: {n}", lambda r, k, n=n: r["S_steps"][n][k],
            share("P", n), f"{_ms([r['S_steps'][n]['tokens'] for r in results])[0] / 1e3:.0f}k",
            f"{_ms([r['S_steps'][n]['forwards'] for r in results])[0]:.0f}")
    gaps = ["", "| comparison (held-out loss, relative) | 75pct | 50pct |", "| --- | ---: | ---: |"]

    def gap(label, a, b):
        cells = [fmt([a(r, n) / b(r, n) - 1 for r in results], pct=True) + "%" for n in SMALL]
        gaps.append(f"| {label} | {cells[0]} | {cells[1]} |")

    def h(arm):
        return lambda r, n: ev(r, arm, "stage2", n, "held_out_loss")

    gap("(a) N vs S: nested vs separate, equal tokens per model", h("N"), lambda r, n: r["S"][n]["held_out_loss"])
    gap("(b) P vs S': nested vs separate, same per-budget steps", h("P"), lambda r, n: r["S_steps"][n]["held_out_loss"])
    gap("(c) N vs P: sandwich vs one budget per step, equal compute", h("N"), h("P"))
    gap("F vs SF: nested (no router) vs separate, equal tokens per model", h("F"), lambda r, n: r["S_F"][n]["held_out_loss"])
    gap("F vs N: importance search vs router architectures, same training", h("F"), h("N"))
    full = ["", "| full budget (held-out loss) | N (weighted 0.5/0.3/0.2) | Nu (equal weights) | parent |",
            "| --- | ---: | ---: | ---: |",
            f"| (e) | {fmt([ev(r, 'N', 'stage2', 'full', 'held_out_loss') for r in results])} | "
            f"{fmt([ev(r, 'Nu', 'stage2', 'full', 'held_out_loss') for r in results])} | "
            f"{fmt([r['parent']['held_out_loss'] for r in results])} |"]
    band = ["", "| budget | target | router argmax (raw), N | after repair, N | raw, P | after repair, P |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for n in SMALL:
        band.append(f"| {n} | {results[0]['N']['frozen'][n]['target']:.0%} | "
                    f"{fmt([r['N']['frozen'][n]['raw'] for r in results], pct=True)}% | "
                    f"{fmt([r['N']['frozen'][n]['final'] for r in results], pct=True)}% | "
                    f"{fmt([r['P']['frozen'][n]['raw'] for r in results], pct=True)}% | "
                    f"{fmt([r['P']['frozen'][n]['final'] for r in results], pct=True)}% |")
    return "\n".join(rows + gaps + full + band)


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def bars(ax, groups, series, title, ylabel):
        w = 0.8 / len(series)
        for k, (label, get) in enumerate(series):
            ms = [_ms([get(r, g) for r in results]) for g in groups]
            ax.bar([i + (k - (len(series) - 1) / 2) * w for i in range(len(groups))], [m for m, _ in ms], w,
                   yerr=[s for _, s in ms], capsize=3, label=label)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=6)

    def ev(arm, stage="stage2", key="held_out_loss"):
        return lambda r, n: r[arm]["evals"][stage][n][key]

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    bars(axes[0], list(SMALL), [("N nested (sandwich)", ev("N")), ("S separate, equal tokens", lambda r, n: r["S"][n]["held_out_loss"]),
                                ("P nested (one per step)", ev("P")),
                                ("S' separate, P's steps", lambda r, n: r["S_steps"][n]["held_out_loss"])],
         "(a, b) nested vs separate", "held-out loss (nats/byte)")
    bars(axes[1], ["full", *SMALL], [("N sandwich", ev("N")), ("P one per step, same compute", ev("P"))],
         "(c) equal compute", "held-out loss (nats/byte)")
    bars(axes[2], ["full", *SMALL], [("after stage 1", ev("N", "stage1", "answer_loss_long")),
                                     ("after stage 2", ev("N", "stage2", "answer_loss_long"))],
         "(d) long tasks, N", "long-task answer loss (nats/token)")
    bars(axes[3], ["full", *SMALL], [("stage 2 weighted .5/.3/.2", ev("N")), ("stage 2 equal", ev("Nu"))],
         "(e) stage-2 weights", "held-out loss (nats/byte)")
    fig.tight_layout()
    fig.savefig(out / "elastic_experiment.png", dpi=110)
    print(f"plot: {out / 'elastic_experiment.png'}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parent", default="runs/default/checkpoint", help="pretraining state dir or HF checkpoint")
    ap.add_argument("--recipe", default=str(ROOT / "training/recipes/default.toml"))
    ap.add_argument("--out", default="runs/experiment")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=1, help="seeds run in parallel processes (one thread each)")
    ap.add_argument("--quick", action="store_true", help="tiny token counts: a smoke run")
    ap.add_argument("--report-only", action="store_true", help="aggregate OUT/seed*/results.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_recipe(args.recipe)
    if not args.report_only:
        parent = out / "parent"
        if not (parent / "config.json").is_file():
            make_parent(Path(args.parent), base, parent)
        if len(args.seeds) == 1 or args.jobs == 1:
            torch.set_num_threads(1)
            for s in args.seeds:
                one_seed(base, parent, out / f"seed{s}", s, args.quick)
        else:  # one process per seed, at most --jobs at once
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            pending, running = list(args.seeds), []
            while pending or running:
                while pending and len(running) < args.jobs:
                    s = pending.pop(0)
                    cmd = [sys.executable, __file__, "--parent", args.parent, "--recipe", args.recipe, "--out", args.out,
                           "--seeds", str(s)] + (["--quick"] if args.quick else [])
                    log = open(out / f"seed{s}.log", "w")
                    running.append((s, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)))
                time.sleep(2)
                for s, p in list(running):
                    if p.poll() is not None:
                        running.remove((s, p))
                        if p.returncode:
                            raise SystemExit(f"seed {s} failed: see {out / f'seed{s}.log'}")
            if not args.seeds:
                return
    results = [json.loads((out / f"seed{s}" / "results.json").read_text()) for s in args.seeds
               if (out / f"seed{s}" / "results.json").is_file()]
    if not results:
        raise SystemExit(f"no results under {out}")
    text = table(results)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(text)
    plot(results, out)


if __name__ == "__main__":
    main()
