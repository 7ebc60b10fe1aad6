"""Evaluate the shipped default model (elastic_export/default_model) per budget, as shipped (BF16 weights
computed in float32): held-out loss on the CPython stdlib + task mixture, exact match and answer loss on
short and long arithmetic tasks. The items are those of the training run's evaluations.

    OMP_NUM_THREADS=1 python benchmarks/default_model_eval.py [--tasks 100] [--windows 16]
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


def main(argv=None) -> None:
    from elastic_export import default_model_path
    from elastic_export.nested import load_nested
    from elastic_export.tokenizer import load_tokenizer
    from training.data import build_mixture
    from training.recipe import load_recipe
    from training.trainer import evaluate_budgets

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", type=int, default=100)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    PATH = default_model_path()
    nested = load_nested(PATH, dtype="float32")
    r = load_recipe(PATH / "recipe.toml")
    tok = load_tokenizer(PATH / "tokenizer")
    mixture = build_mixture(r["data"], tok, r["seed"])
    seq = max(s["seq_len"] for s in r["stages"])
    t = time.time()
    res = evaluate_budgets(nested.model, nested.budgets, mixture, tok, seq, args.windows, args.tasks, r["seed"])
    res["seconds"] = time.time() - t
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
