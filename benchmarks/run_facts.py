"""The facts of a training run, derived from its own records (docs/RESULTS.md quotes this output).

From a nested checkpoint's manifest (``training``: steps, tokens, per-stage steps / tokens / steps per
budget, evaluations) and, when given, the run's ``metrics.jsonl`` (wall time, skipped steps, compute in
forward equivalents), it prints one Markdown table per run: nothing is typed in by hand.

    python benchmarks/run_facts.py elastic_export/default_model [--metrics runs/default/metrics.jsonl]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def facts(nested: Path, metrics: Path | None = None) -> str:
    m = json.loads((nested / "elastic.json").read_text())
    tr = m.get("training") or {}
    if "stages" not in tr:
        raise SystemExit(f"{nested}/elastic.json records no per-stage figures (written before issue 10's trainer)")
    steps = {}
    if metrics is not None and metrics.is_file():
        for line in metrics.read_text().splitlines():
            x = json.loads(line) if line.strip() else {}
            if "loss" in x and "stage" in x:
                steps.setdefault(x["stage"], []).append(x)
    lines = [f"run `{tr.get('recipe')}`: {tr['steps']} steps, {tr['tokens']:,} tokens",
             "", "| stage | kind | sampling | steps | seq x batch | tokens | steps per budget | logged steps | "
                 "skipped (no signal) | forward equivalents |",
             "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for st in tr["stages"]:
        recs = steps.get(st["name"], [])
        per = ", ".join(f"{k} {v}" for k, v in (st.get("steps_per_budget") or {}).items()) or "-"
        fws = [x["forwards"] for x in recs if "forwards" in x]
        # per step when logged every step; else the logged steps' mean times the stage's steps (~)
        fw = "-" if not fws else f"{sum(fws):.0f}" if len(fws) == st["steps"] else \
            f"~{sum(fws) / len(fws) * st['steps']:.0f}"
        lines.append(f"| {st['name']} | {st['kind']} | {st['sampling'] or '-'} | {st['steps']} | "
                     f"{st['seq_len']} x {st['batch_size']} | {st['tokens']:,} | {per} | {len(recs)} | "
                     f"{sum(bool(x.get('skipped')) for x in recs)} | {fw} |")
    if steps:
        last = max((x for rs in steps.values() for x in rs if "elapsed" in x), key=lambda x: x["step"], default=None)
        if last is not None:
            lines += ["", f"training wall time (sum of step times, evaluations excluded): {last['elapsed'] / 60:.1f} min"]
    elastic = [s for s in tr["stages"] if s["kind"] == "elastic"]
    lines += ["", f"elastic steps: {sum(s['steps'] for s in elastic)}, elastic tokens: "
                  f"{sum(s['tokens'] for s in elastic):,}"]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("nested", type=Path)
    ap.add_argument("--metrics", type=Path, default=None, help="the run's metrics.jsonl (logged per step or every N)")
    a = ap.parse_args(argv)
    print(facts(a.nested, a.metrics))


if __name__ == "__main__":
    main()
