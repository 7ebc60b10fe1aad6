"""The validation report: ``report.json`` (for machines, schema-versioned), ``report.md`` (for people)
and PNG plots (matplotlib, Agg backend: no display needed).

Plots:
- ``accuracy_vs_params.png``: held-out loss and task accuracy against parameter count, per budget,
  for the reference and every backend;
- ``memory.png``: nested family against separate models: weights in memory, on disk, measured peak;
- ``parity.png``: max |logit error| per backend and budget (log scale) with the threshold lines;
- ``plan.png`` (when a plan was made): memory needed per budget against each device's usable memory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

QUANT_FORMATS = ("int8", "int4", "fp8")  # build --quant precisions (validation/thresholds.py)

SCHEMA = "elastic-export/validation-report"
SCHEMA_VERSION = 1
PLOTS = ("accuracy_vs_params.png", "memory.png", "parity.png", "plan.png")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _mb(n: float) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} GB" if abs(n) >= 1e9 else f"{n / 1e6:.2f} MB"


def _f(v, spec=".3g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


# ---- plots ---------------------------------------------------------------------------------------

def plot_accuracy(report: dict, path: Path) -> None:
    plt = _plt()
    params = {b: v["params"] for b, v in report["source"]["budgets"].items()}
    order = sorted(params, key=params.get)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    x = [params[b] for b in order]
    ref = report["reference"]
    ax1.plot(x, [ref[b]["loss"] for b in order], "o-", color="black", label="reference (torch fp32)", zorder=3)
    ax2.plot(x, [ref[b]["task_acc"] for b in order], "o-", color="black", label="reference (torch fp32)", zorder=3)
    for name in report["backends"]:
        rows = {r["budget"]: r["metrics"] for r in report["parity"] if r["backend"] == name and r["metrics"]}
        bx = [params[b] for b in order if b in rows]
        if not bx:
            continue
        ax1.plot(bx, [math.log(rows[b]["ppl"]) for b in order if b in rows], "x--", label=name)
        ax2.plot(bx, [rows[b]["task_acc"] for b in order if b in rows], "x--", label=name)
    for ax, title in ((ax1, "held-out loss (nats/token)"), (ax2, "task exact-match accuracy")):
        ax.set_xlabel("parameters")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        for b in order:
            ax.annotate(b, (params[b], ax.get_ylim()[0]), fontsize=7, ha="center", va="bottom")
    ax2.set_ylim(-0.05, 1.05)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_memory(report: dict, path: Path) -> None:
    plt = _plt()
    mem = report.get("memory") or {}
    groups = []
    if "memory" in mem:
        groups.append(("weights in memory", mem["memory"]["nested"], mem["memory"]["separate"]))
    if "disk" in mem and "separate" in mem["disk"]:
        groups.append(("weights on disk", mem["disk"]["nested"], mem["disk"]["separate"]))
    if "peak" in mem:
        groups.append(("measured peak\n(net of baseline)", mem["peak"]["family_net"], mem["peak"]["separate_net"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    if groups:
        xs = range(len(groups))
        ax.bar([i - 0.2 for i in xs], [g[1] / 1e6 for g in groups], 0.4, label="nested family (one process)")
        ax.bar([i + 0.2 for i in xs], [g[2] / 1e6 for g in groups], 0.4, label="separate models (sum)")
        ax.set_xticks(list(xs), [g[0] for g in groups])
        ax.set_ylabel("MB")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "memory not measured", ha="center", va="center")
    ax.set_title("memory: nested family vs separate models")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_parity(report: dict, path: Path) -> None:
    plt = _plt()
    rows = [r for r in report["parity"] if r["metrics"]]
    budgets = list(report["source"]["budgets"])
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(backends) * max(1, len(budgets)) / 2), 4))
    width = 0.8 / max(1, len(budgets))
    for j, b in enumerate(budgets):
        vals = []
        for be in backends:
            r = next((r for r in rows if r["backend"] == be and r["budget"] == b), None)
            vals.append(max(r["metrics"]["abs_logit"], 1e-9) if r else float("nan"))
        ax.bar([i + (j - (len(budgets) - 1) / 2) * width for i in range(len(backends))], vals, width, label=b)
    for prec, lim in report["thresholds"].items():
        if any(r["precision"] == prec for r in rows):
            ax.axhline(lim["max_abs_logit"], ls="--", color="red" if prec == "fp32" else "orange",
                       label=f"{prec} threshold")
    ax.set_yscale("log")
    ax.set_xticks(range(len(backends)), backends)
    ax.set_ylabel("max |logit - reference|")
    ax.set_title("parity error per backend and budget (1e-9 = exact)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_plan(report: dict, path: Path) -> None:
    plt = _plt()
    plan = report["plan"]
    devs = plan["devices"]
    dt = next(iter(devs[0]["dtypes"]))
    budgets = list(devs[0]["dtypes"][dt]["budgets"])
    fig, ax = plt.subplots(figsize=(8, 4))
    totals = [devs[0]["dtypes"][dt]["budgets"][b]["total"] / 1e9 for b in budgets]
    ax.bar(range(len(budgets)), totals, color="tab:blue")
    ax.set_xticks(range(len(budgets)), budgets)
    for d in devs:
        ax.axhline(d["profile"]["usable_gb"], ls="--", lw=1)
        ax.text(len(budgets) - 0.5, d["profile"]["usable_gb"], d["profile"]["label"], fontsize=7, va="bottom",
                ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("GB (log scale)")
    ax.set_title(f"memory per budget at {dt}, context {plan['context']}, batch {plan['batch']} "
                 "(lines: usable memory)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_deployment(comparison: dict, plans: list[dict], path: str | Path) -> None:
    """``plan-memory --plot``: weights of the nested family against separate models, and each budget's
    total at every planned context against the usable memory of the planned devices."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    c = comparison
    names = list(c["per_budget"])
    from .planner import separate_deployments

    bars = [(f"nested\n{' + '.join(names)}", c["nested"])]
    bars += [(f"separate\n{' + '.join(group)}", n) for group, n in separate_deployments(c)]
    ax1.bar(range(len(bars)), [b[1] / 1e9 for b in bars], color=["tab:blue", "tab:orange", "tab:red"][:len(bars)])
    for i, (_, v) in enumerate(bars):
        ax1.text(i, v / 1e9, f"{v / 1e9:.1f} GB", ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
    ax1.set_ylabel("GB")
    ax1.set_title(f"weights at {c['dtype']}")
    dt = next(iter(plans[0]["devices"][0]["dtypes"]))
    width = 0.8 / len(plans)
    for j, p in enumerate(plans):
        rows = p["devices"][0]["dtypes"][dt]["budgets"]
        ax2.bar([i + (j - (len(plans) - 1) / 2) * width for i in range(len(rows))],
                [r["total"] / 1e9 for r in rows.values()], width, label=f"context {p['context']}")
    ax2.set_xticks(range(len(names)), names)
    for d in plans[0]["devices"]:
        ax2.axhline(d["profile"]["usable_gb"], ls="--", lw=1, color="gray")
        ax2.text(len(names) - 0.5, d["profile"]["usable_gb"], d["profile"]["label"], fontsize=7, ha="right",
                 va="bottom")
    ax2.set_ylabel("GB")
    ax2.set_title(f"weights + KV + SSM/conv state + activations at {dt} (lines: usable memory)")
    ax2.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- markdown ------------------------------------------------------------------------------------

def markdown(report: dict) -> str:
    src = report["source"]
    out = [f"# Validation report: {'PASSED' if report['passed'] else 'FAILED'}", "",
           f"- source: `{src['path']}`" + (f", build `{src['build']}`" if src.get("build") else "")
           + f"; reference: {src['reference']}",
           f"- backends: {', '.join(report['backends'])}"
           + (f"; skipped: {', '.join(f'{k} ({v})' for k, v in report['skipped_backends'].items())}"
              if report["skipped_backends"] else ""),
           f"- evaluation: {report['eval']['rows'][0]} x {report['eval']['rows'][1]} held-out tokens, "
           f"{report['eval']['decode_steps']} teacher-forced decode steps, {report['eval']['n_tasks']} tasks "
           f"({report['eval']['task_source']}), greedy agreement over {report['eval']['greedy_tokens']} tokens",
           f"- created {report['created']} by elastic-export {report['tool_version']}", ""]
    if report["failures"]:
        out += ["## Failures", ""] + [f"- {f}" for f in report["failures"]] + [""]
    out += ["## Budgets (reference: torch elastic forward, float32)", "",
            "| budget | parameters | held-out ppl | loss | task accuracy |", "| --- | ---: | ---: | ---: | ---: |"]
    moe = any("active_params" in v for v in src["budgets"].values())
    if moe:  # MoE families: active parameters and routed experts (kept / per token) per MoE layer
        out[-2:] = ["| budget | parameters | active | routed experts kept (per token) | held-out ppl | loss | "
                    "task accuracy |", "| --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for b, v in src["budgets"].items():
        r = report["reference"].get(b, {})
        extra = ""
        if moe:
            kept = sorted(set(zip(v.get("experts", []), v.get("experts_per_token", []))))
            extra = (f" {v.get('active_params', v['params']):,} | "
                     f"{', '.join(f'{e} ({k})' for e, k in kept) or '-'} |")
        out.append(f"| {b} | {v['params']:,} |{extra} {_f(r.get('ppl'), '.3f')} | {_f(r.get('loss'), '.4f')} | "
                   f"{_f(r.get('task_acc'), '.3f')} |")
    out += ["", "## Accuracy parity", "",
            "| backend | budget | prec. | max abs logit | mean abs | decode max | top-1 | ppl rel. delta | "
            "task acc | greedy | result |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in report["parity"]:
        m = r["metrics"]
        res = "pass" if r["passed"] else "FAIL: " + "; ".join(r["failed"])
        out.append(f"| {r['backend']} | {r['budget']} | {r['precision']} | {_f(m.get('abs_logit'), '.2e')} | "
                   f"{_f(m.get('mean_abs_logit'), '.2e')} | {_f(m.get('decode_max_abs'), '.2e')} | "
                   f"{_f(m.get('top1'), '.4f')} | {_f(m.get('ppl_rel_delta'), '.2e')} | "
                   f"{_f(m.get('task_acc'), '.3f')} | {_f(m.get('greedy'), '.3f')} | {res} |")
    quant = [r for r in report["parity"] if r["precision"] in QUANT_FORMATS and r["metrics"].get("ppl")]
    if quant:  # issue 14: the held-out loss change of each quantized build against float32
        out += ["", "### Quantized vs float32 (held-out text)", "",
                "| backend | budget | format | ppl float32 | ppl quantized | ppl change | loss change | ppl bound |",
                "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
        for r in quant:  # judged here on the perplexity bound alone (the row above has every other criterion)
            m = r["metrics"]
            bound = report["thresholds"].get(r["precision"], {}).get("max_ppl_rel_delta")
            verdict = "-" if bound is None else (f"within {100 * bound:g}%" if abs(m["ppl"] / m["ppl_ref"] - 1) <= bound
                                                 else f"OVER {100 * bound:g}%")
            out.append(f"| {r['backend']} | {r['budget']} | {r['precision']} | {m['ppl_ref']:.3f} | {m['ppl']:.3f} | "
                       f"{100 * (m['ppl'] / m['ppl_ref'] - 1):+.2f}% | {math.log(m['ppl'] / m['ppl_ref']):+.4f} | "
                       f"{verdict} |")
    out += ["", "Thresholds: " + "; ".join(f"{p}: " + ", ".join(f"{k} {v:g}" for k, v in t.items())
                                          for p, t in report["thresholds"].items()), ""]
    mem = report.get("memory")
    if mem:
        out += ["## Memory: nested family vs separate models", "", "| measure | nested | separate | ratio |",
                "| --- | ---: | ---: | ---: |"]

        def row(name, a, b):
            out.append(f"| {name} | {_mb(a)} | {_mb(b)} | {b / a:.2f}x |" if a else f"| {name} | - | - | - |")

        row(f"weights in memory ({mem['dtype']})", mem["memory"]["nested"], mem["memory"]["separate"])
        if "disk" in mem and "separate" in mem["disk"]:
            row("weights on disk", mem["disk"]["nested"], mem["disk"]["separate"])
        if "peak" in mem:
            p = mem["peak"]
            row(f"{p['measure']}, whole process", p["family"], p["separate_sum"])
            row(f"{p['measure']}, net of baseline ({_mb(p['baseline'])})", p["family_net"], p["separate_net"])
            how = ("processes forked from one interpreter; whole-process figures are a fresh interpreter's "
                   "baseline plus each process's measured growth") if p.get("isolation") == "fork" else \
                "a fresh interpreter per process"
            out += ["", f"Measured with {how}.",
                    f"Serving all budgets from one process peaks at {_mb(p['family'])}; the largest budget "
                        f"alone at {_mb(p['largest_single'])} ({p['family'] / p['largest_single']:.3f}x). "
                        f"{p['tokens']}-token prefill + {p['decode_steps']} decode steps per budget."]
        out.append("")
    plan = report.get("plan")
    if plan:
        out += [f"## Device plan (context {plan['context']}, batch {plan['batch']})", "",
                "| device | usable | dtype | budgets that fit | family (one copy) |",
                "| --- | ---: | --- | --- | --- |"]
        for d in plan["devices"]:
            for dt, v in d["dtypes"].items():
                out.append(f"| {d['profile']['label']} | {d['profile']['usable_gb']:.2f} GB | {dt} | "
                           f"{', '.join(v['fits']) or 'none'} | {'fits' if v['family']['fits'] else 'does not fit'} "
                           f"({_mb(v['family']['total'])}) |")
        out += ["", "Assumptions: " + "; ".join(plan["assumptions"]) + ".", ""]
    if report.get("plots"):
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]] + [""]
    return "\n".join(out)


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and the plots into ``out_dir``; returns the paths."""
    from elastic_export.hf_io import atomic_write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = dict(report, schema=SCHEMA, schema_version=SCHEMA_VERSION)
    plots = {"accuracy_vs_params.png": plot_accuracy, "memory.png": plot_memory, "parity.png": plot_parity}
    if report.get("plan"):
        plots["plan.png"] = plot_plan
    for name, fn in plots.items():
        fn(report, out_dir / name)
    report["plots"] = list(plots)
    atomic_write_text(out_dir / "report.json", json.dumps(_clean(report), indent=2, allow_nan=False) + "\n")
    atomic_write_text(out_dir / "report.md", markdown(report))
    return {"json": out_dir / "report.json", "md": out_dir / "report.md",
            **{n: out_dir / n for n in plots}}


def _clean(o):
    """JSON-safe: NaN and infinities become null, tensors and numpy scalars plain numbers, paths strings."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item") and not isinstance(o, (str, bytes)):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o
