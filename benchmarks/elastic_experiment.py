"""Issue 4 experiment at the default model's scale: nested vs separate, stage 1 vs 2, uniform vs weighted.

Starting from the default run's parent (the frozen teacher saved in RUN/teacher, i.e. the parent at
the start of elastification), it runs, with the same data windows and evaluation items:

  E  elastic, paper curriculum: stage 1 uniform sampling, stage 2 longer sequences, weighted 0.5/0.3/0.2
  U  the same run after stage 1, but stage 2 with uniform sampling (branching from E's stage-1 checkpoint)
  S  each smaller budget pruned (the same architecture E's router chose) and distilled separately from the
     parent, each given as many tokens as the whole elastic run E

and reports per budget: held-out loss, exact-match accuracy on short and long arithmetic tasks, and
the tokens spent. (a) E vs S; (b) E after stage 1 vs after stage 2 (long tasks); (c) E vs U (full model).

    OMP_NUM_THREADS=1 python benchmarks/elastic_experiment.py --run runs/default --out runs/experiment
    python benchmarks/elastic_experiment.py --quick      # a one-minute smoke run with tiny token counts
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training import checkpoint as ckpt  # noqa: E402
from training.data import build_mixture  # noqa: E402
from training.distill import kd_loss  # noqa: E402
from training.recipe import load_recipe, parent_config  # noqa: E402
from training.trainer import evaluate_budgets, lr_factor, plan_stages, train  # noqa: E402


def experiment_recipe(base: dict, parent: Path, out: Path, quick: bool) -> dict:
    r = copy.deepcopy(base)
    r["model"]["init"] = str(parent)
    r["model"]["config"] = None
    r["out"] = str(out)
    r["output"] = {"path": None, "dtype": "float32"}
    stages = [s for s in r["stages"] if s["kind"] == "elastic"]
    scale = 0.02 if quick else 0.3
    for s in stages:
        s["tokens"] = max(s["batch_size"] * s["seq_len"] * 3, int(s["tokens"] * scale))
        s["warmup_steps"] = min(s["warmup_steps"], 10)
    r["stages"] = stages
    r["router"]["warmup_steps"] = 10
    r["train"]["progress"] = False
    r["train"]["checkpoint_every"] = 10**6
    r["data"]["eval_tasks"] = 10 if quick else 100
    r["data"]["eval_windows"] = 4 if quick else 16
    return r


def make_parent(run: Path, base: dict, dest: Path) -> None:
    from elastic_export.model import NemotronHForCausalLM

    state = ckpt.load_state(run / "teacher")
    if state is None:
        raise SystemExit(f"{run}/teacher/state.pt not found: run the default recipe first")
    with torch.device("meta"):
        model = NemotronHForCausalLM(parent_config(base))
    model.load_state_dict(state["model"], assign=True)
    model.save_pretrained(dest)


def sorted_parent(run: Path):
    """The importance-sorted parent an elastic run started from (its frozen teacher, rank-major)."""
    from elastic_export.hf_io import load_config
    from elastic_export.model import NemotronHForCausalLM

    state = ckpt.load_state(run / "teacher")
    cfg = load_config(run.parent / "parent").replace(head_order=state.get("head_order", "rank_major"))
    with torch.device("meta"):
        model = NemotronHForCausalLM(cfg)
    model.load_state_dict(state["model"], assign=True)
    return model


def separate_run(r: dict, run: Path, subnet, name: str, out: Path) -> dict:
    """Prune the sorted parent to ``subnet`` and distill it from the parent alone, with E's data and token count."""
    from elastic_export.tokenizer import ByteTokenizer

    torch.manual_seed(r["seed"])
    teacher = sorted_parent(run).eval()
    student = sorted_parent(run).train()
    mixture = build_mixture(r["data"], ByteTokenizer(), r["seed"])
    stages = plan_stages(r["stages"])
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    log = []
    t0 = time.time()
    tokens = 0
    for st in stages:
        s = st.spec
        for local in range(st.steps):
            for g in opt.param_groups:
                g["lr"] = s["lr"] * lr_factor(local, st.steps, s["warmup_steps"], s["min_lr_ratio"])
            base = st.window_offset + local * s["batch_size"]
            batch = mixture.batch(range(base, base + s["batch_size"]), s["seq_len"])
            x = batch[:, :-1]
            with torch.no_grad():
                t_logits = teacher(x)
            loss = kd_loss(student(x, subnet=subnet), t_logits, r["distill"]["temperature"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), r["train"]["grad_clip"])
            opt.step()
            tokens += s["batch_size"] * s["seq_len"]
            log.append(float(loss.detach()))
    final_seq = max(st.spec["seq_len"] for st in stages)  # as the trainer's evaluations
    ev = evaluate_budgets(student, {name: subnet}, mixture, ByteTokenizer(), final_seq, r["data"]["eval_windows"],
                          r["data"]["eval_tasks"], r["seed"], r["train"]["eval_batch_size"])["budgets"][name]
    ev.update(tokens=tokens, seconds=time.time() - t0, kd_first=log[0], kd_last=log[-1])
    (out / f"separate_{name}.json").write_text(json.dumps(ev, indent=2))
    return ev


def evals_of(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()
            if '"event": "eval"' in l]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/default", help="the default model's run directory (holds teacher/)")
    ap.add_argument("--recipe", default=str(ROOT / "training/recipes/default.toml"))
    ap.add_argument("--out", default="runs/experiment")
    ap.add_argument("--quick", action="store_true", help="tiny token counts: a smoke run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from OUT/results.json")
    args = ap.parse_args(argv)
    if args.plot_only:
        return plot(json.loads((Path(args.out) / "results.json").read_text()), Path(args.out))
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_recipe(args.recipe)
    parent = out / "parent"
    if not (parent / "config.json").is_file():
        make_parent(Path(args.run), base, parent)
    t_start = time.time()

    # E and U: one elastic run to the end of stage 1, then two stage-2 branches.
    r_e = experiment_recipe(base, parent, out / "elastic_weighted", args.quick)
    s1_end = plan_stages(r_e["stages"])[0].end
    t = time.time()
    train(r_e, resume=False, stop_after_step=s1_end)
    # the stage-1 checkpoint is written at the stage end: branch U from it
    shutil.rmtree(out / "elastic_uniform", ignore_errors=True)
    shutil.copytree(out / "elastic_weighted", out / "elastic_uniform")
    e_path = train(r_e)
    e_seconds = time.time() - t
    r_u = copy.deepcopy(r_e)
    r_u["out"] = str(out / "elastic_uniform")
    r_u["stages"][1]["sampling"] = "uniform"
    t = time.time()
    train(r_u)
    u_seconds = time.time() - t

    from elastic_export.nested import load_nested

    nested = load_nested(e_path)
    budgets, manifest = nested.budgets, nested.manifest
    e_tokens = manifest["training"]["tokens"]
    ev_e, ev_u = evals_of(out / "elastic_weighted"), evals_of(out / "elastic_uniform")

    # S: each smaller budget separately, as many tokens as the whole elastic run
    separate = {}
    for name, f in zip(base["budgets"]["names"], base["budgets"]["fractions"]):
        if f < 1.0:
            separate[name] = separate_run(r_e, out / "elastic_weighted", budgets[name], name, out)
    from elastic_export.tokenizer import ByteTokenizer

    mixture = build_mixture(r_e["data"], ByteTokenizer(), r_e["seed"])
    seq = max(s["seq_len"] for s in r_e["stages"])
    parent_eval = evaluate_budgets(sorted_parent(out / "elastic_weighted"), {"full": budgets["full"]}, mixture,
                                   ByteTokenizer(), seq, r_e["data"]["eval_windows"], r_e["data"]["eval_tasks"],
                                   r_e["seed"], r_e["train"]["eval_batch_size"])["budgets"]["full"]

    results = {"quick": args.quick, "parent": parent_eval, "elastic_tokens": e_tokens, "elastic_seconds": e_seconds,
               "uniform_stage2_seconds": u_seconds, "total_seconds": time.time() - t_start,
               "elastic_after_stage1": ev_e[0]["budgets"], "elastic_after_stage2": ev_e[-1]["budgets"],
               "uniform_after_stage2": ev_u[-1]["budgets"], "separate": separate,
               "budgets": {n: b.to_dict() for n, b in budgets.items()}}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "budgets"}, indent=2))
    plot(results, out)


def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["elastic_after_stage2"])
    small = [n for n in names if n in res["separate"]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    x = range(len(small))
    w = 0.38
    e = [res["elastic_after_stage2"][n]["held_out_loss"] for n in small]
    s = [res["separate"][n]["held_out_loss"] for n in small]
    axes[0].bar([i - w / 2 for i in x], e, w, label=f"nested (one run, {res['elastic_tokens'] / 1e6:.2f}M tokens)")
    axes[0].bar([i + w / 2 for i in x], s, w,
                label=f"separate ({sum(v['tokens'] for v in res['separate'].values()) / 1e6:.2f}M tokens)")
    axes[0].set_xticks(list(x), small)
    axes[0].set_ylabel("held-out loss (nats/byte)")
    axes[0].set_title("(a) nested vs separately distilled")
    axes[0].legend(fontsize=7)
    lo = min(e + s)
    axes[0].set_ylim(lo * 0.95, max(e + s) * 1.02)
    xs = range(len(names))
    for k, (key, label) in enumerate([("elastic_after_stage1", "after stage 1"),
                                      ("elastic_after_stage2", "after stage 2")]):
        axes[1].bar([i + (k - 0.5) * w for i in xs], [res[key][n]["answer_loss_long"] for n in names], w,
                    label=label)
    axes[1].set_xticks(list(xs), names)
    axes[1].set_ylabel("long-task answer loss (nats/token)")
    axes[1].set_title("(b) long tasks, stage 1 vs stage 2")
    axes[1].legend(fontsize=7)
    for k, (key, label) in enumerate([("uniform_after_stage2", "stage 2 uniform"),
                                      ("elastic_after_stage2", "stage 2 weighted .5/.3/.2")]):
        axes[2].bar([i + (k - 0.5) * w for i in xs], [res[key][n]["held_out_loss"] for n in names], w, label=label)
    vals = [res[k][n]["held_out_loss"] for k in ("uniform_after_stage2", "elastic_after_stage2") for n in names]
    axes[2].set_ylim(min(vals) * 0.95, max(vals) * 1.02)
    axes[2].set_xticks(list(xs), names)
    axes[2].set_ylabel("held-out loss (nats/byte)")
    axes[2].set_title("(c) uniform vs weighted stage 2")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "elastic_experiment.png", dpi=110)
    print(f"plot: {out / 'elastic_experiment.png'}")


if __name__ == "__main__":
    main()
