"""Held-out loss per budget of the shipped model, float against its quantized copies (issue 14).

Every variant is one quantized nested checkpoint (`elastic-export quantize`), loaded with the torch
engine's model (qmodel.QuantizedNemotronH: each layer dequantized just before it runs) and scored on
the same held-out windows of the training mixture as benchmarks/default_model_eval.py. Calibration
(`--calib`, activation-aware "mse") takes windows of the mixture's *train* split, never held-out ones.

    OMP_NUM_THREADS=1 python benchmarks/quant_eval.py [--windows 32] [--calib-windows 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = [  # (name, format, method, calibrated)
    ("int8 rtn", "int8", "rtn", False), ("int8 mse+calib", "int8", "mse", True),
    ("fp8 rtn", "fp8", "rtn", False),
    ("int4 rtn", "int4", "rtn", False), ("int4 mse", "int4", "mse", False), ("int4 mse+calib", "int4", "mse", True),
]


@torch.no_grad()
def held_out_loss(model, budgets, windows) -> dict[str, float]:
    from training.distill import ce_loss

    return {n: sum(float(ce_loss(model(w[None, :-1], subnet=s), w[None, 1:])) for w in windows) / len(windows)
            for n, s in budgets.items()}


def main(argv=None) -> None:
    import elastic_export as ee
    from elastic_export import quant
    from elastic_export.qcheckpoint import quantize_nested
    from elastic_export.tokenizer import load_tokenizer
    from training.data import build_mixture
    from training.recipe import load_recipe

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--windows", type=int, default=32, help="held-out windows")
    ap.add_argument("--calib-windows", type=int, default=32, help="train windows for --calib variants")
    ap.add_argument("--int4-block", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    src = ee.default_model_path()
    r = load_recipe(src / "recipe.toml")
    mix = build_mixture(r["data"], load_tokenizer(src / "tokenizer"), r["seed"])
    seq = max(s["seq_len"] for s in r["stages"])
    split = "held" if any(len(s.held) > seq + 1 for s in mix.sources) else "train"
    held = mix.batch(range(10**9, 10**9 + args.windows), seq, split)  # as training.trainer.evaluate_budgets
    calib = mix.batch(range(args.calib_windows), seq, "train")
    fl = ee.load(src, dtype="float32")
    rows = {"float32": held_out_loss(fl, fl.budgets, held)}
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fmt, method, cal in VARIANTS:
            t = time.time()
            out = Path(tmp) / name.replace(" ", "_").replace("+", "_")
            block = args.int4_block if fmt == "int4" else None
            quantize_nested(src, out, quant.QuantSpec(fmt, block, method), calib if cal else None,
                            {"windows": args.calib_windows, "split": "train"} if cal else None)
            qm = ee.load(out)
            rows[name] = held_out_loss(qm, qm.budgets, held)
            sizes[name] = (out / "model.safetensors").stat().st_size
            print(f"{name}: {time.time() - t:.1f} s", file=sys.stderr)
    sizes["float32"] = (src / "model.safetensors").stat().st_size
    budgets = list(fl.budgets)
    print(f"held-out loss, {args.windows} windows of {seq} tokens ({split} split); calibration {args.calib_windows} "
          f"train windows; change against float32 in %")
    print("| variant | model.safetensors | " + " | ".join(budgets) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in budgets) + " |")
    for name, losses in rows.items():
        cells = [f"{losses[b]:.4f}" + ("" if name == "float32" else
                                       f" ({100 * (losses[b] / rows['float32'][b] - 1):+.2f}%)") for b in budgets]
        print(f"| {name} | {sizes[name] / 1e6:.2f} MB | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"losses": rows, "bytes": sizes, "windows": args.windows,
                                               "calib_windows": args.calib_windows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
