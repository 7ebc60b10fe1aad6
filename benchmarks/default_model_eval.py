"""Evaluate the shipped default model (elastic_export/default_model) per budget, as shipped (BF16 weights
computed in float32): held-out loss on the CPython stdlib + task mixture, exact match and answer loss on
short and long arithmetic tasks. The items are those of the training run's evaluations.

    OMP_NUM_THREADS=1 python benchmarks/default_model_eval.py [--tasks 100] [--windows 16] [--compare OLD_COPY]
        [--data RECIPE]  # score every model on one recipe's held-out mixture
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def evaluate(path: Path, tasks: int, windows: int, data_from: Path | None = None) -> dict:
    from elastic_export.nested import load_nested
    from elastic_export.tokenizer import load_tokenizer
    from training.data import build_mixture
    from training.recipe import load_recipe
    from training.trainer import evaluate_budgets

    nested = load_nested(path, dtype="float32")
    r = load_recipe(path / "recipe.toml")
    tok = load_tokenizer(path / "tokenizer")
    d = load_recipe(data_from) if data_from is not None else r  # whose held-out data
    mixture = build_mixture(d["data"], tok, d["seed"])
    seq = max(s["seq_len"] for s in r["stages"])
    t = time.time()
    res = evaluate_budgets(nested.model, nested.budgets, mixture, tok, seq, windows, tasks, r["seed"])
    res["seconds"] = time.time() - t
    return res


def main(argv=None) -> None:
    from elastic_export import default_model_path

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", type=int, default=100)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compare", type=Path, nargs="*", default=[],
                    help="other nested checkpoints (e.g. a copy of the previous shipped model) evaluated in the same run")
    ap.add_argument("--data", type=Path, default=None,
                    help="a recipe.toml whose [data] mixture every model is scored on (default: each model's own "
                         "recipe; give one to compare models trained on different mixtures on the same windows)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = {"shipped": default_model_path(), **{str(p): p for p in args.compare}}
    results = {name: evaluate(Path(p), args.tasks, args.windows, args.data) for name, p in models.items()}
    print(json.dumps(results, indent=2))
    print("\n| model | budget | params | held-out loss | exact short | exact long | answer loss short | answer loss long |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, res in results.items():
        for b, e in res["budgets"].items():
            print(f"| {name} | {b} | {e['params']:,} | {e['held_out_loss']:.3f} | {e['acc_short']:.0%} | "
                  f"{e['acc_long']:.0%} | {e['answer_loss_short']:.3f} | {e['answer_loss_long']:.3f} |")


if __name__ == "__main__":
    main()
