"""Pass/fail thresholds of the accuracy checks, per precision. The one place they live.

Every backend is compared with the reference (the torch elastic forward of the nested weights in
float32) on the same prompts. A metric named ``max_*`` or ``*_delta`` fails above its threshold;
a metric named ``min_*`` fails below it.

- ``max_abs_logit`` / ``max_mean_abs_logit``: largest and mean absolute logit difference, prefill
  and teacher-forced decode steps together (a dropped or stale decode state shows up here).
- ``min_top1``: fraction of positions whose argmax token matches the reference.
- ``max_ppl_rel_delta``: |ppl - ppl_ref| / ppl_ref on held-out text.
- ``max_task_delta``: |exact-match accuracy - reference accuracy| on the synthetic tasks.
- ``min_greedy``: greedy-generation agreement: mean over prompts of the matching prefix length of
  N generated tokens, divided by N (1.0: every prompt generates the reference's N tokens).

The float32 figures are what a correct export reaches with room to spare (issue 5 measures
<= 1e-4 logit error for ONNX Runtime); bf16 ones allow the rounding of 8-bit mantissa weights and
activations over a few layers. Thresholds are absolute, so they assume logits of order 1-30
(a trained LM head); override them from the command line (``--threshold bf16.max_abs_logit=1.0``).

Quantized builds (``build --quant``, elastic_export.onnx_quant) are judged by their format's row: what
issue 14 asks of the held-out perplexity (int8 within 1%, int4 within 5% of float32), and logit / top-1 /
task / greedy bounds that allow the weights' rounding (docs/quantization.md has the figures measured on
the shipped model).
"""

from __future__ import annotations

import copy

from elastic_export.errors import ConfigError

THRESHOLDS: dict[str, dict[str, float]] = {
    "fp32": {
        "max_abs_logit": 1e-3,
        "max_mean_abs_logit": 1e-4,
        "min_top1": 0.99,
        "max_ppl_rel_delta": 1e-3,
        "max_task_delta": 0.05,
        "min_greedy": 0.9,
    },
    "bf16": {
        "max_abs_logit": 0.5,
        "max_mean_abs_logit": 0.08,
        "min_top1": 0.9,
        "max_ppl_rel_delta": 0.05,
        "max_task_delta": 0.15,
        "min_greedy": 0.5,
    },
    # weight-only quantized builds (issue 14)
    "int8": {
        "max_abs_logit": 1.0,
        "max_mean_abs_logit": 0.1,
        "min_top1": 0.9,
        "max_ppl_rel_delta": 0.01,
        "max_task_delta": 0.15,
        "min_greedy": 0.5,
    },
    "int4": {
        "max_abs_logit": 4.0,
        "max_mean_abs_logit": 0.4,
        "min_top1": 0.75,
        "max_ppl_rel_delta": 0.05,
        "max_task_delta": 0.25,
        "min_greedy": 0.2,  # exact greedy prefixes: ~7% top-1 disagreement per position compounds (0.27 measured)
    },
    "fp8": {
        "max_abs_logit": 2.0,
        "max_mean_abs_logit": 0.2,
        "min_top1": 0.85,
        "max_ppl_rel_delta": 0.03,
        "max_task_delta": 0.2,
        "min_greedy": 0.4,
    },
}

PRECISIONS = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16",
              "fp16": "bf16", "float16": "bf16",  # fp16 is judged with the bf16 thresholds
              "int8": "int8", "int4": "int4", "fp8": "fp8"}


def precision_name(dtype) -> str:
    """'fp32' or 'bf16' for a torch dtype or a dtype name."""
    name = str(dtype).removeprefix("torch.")
    if name not in PRECISIONS:
        raise ConfigError(f"no thresholds for precision {name!r}", field="dtype",
                          fix=f"use one of {sorted(THRESHOLDS)}")
    return PRECISIONS[name]


def parse_overrides(items: list[str] | tuple[str, ...] | None) -> dict[str, dict[str, float]]:
    """``["fp32.max_abs_logit=1e-4", "min_top1=0.95"]`` -> {precision: {metric: value}}.

    A metric without a precision prefix applies to every precision.
    """
    out: dict[str, dict[str, float]] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"threshold {item!r} is not KEY=VALUE", field="--threshold",
                              fix="write e.g. fp32.max_abs_logit=1e-4")
        prec, dot, metric = key.strip().rpartition(".")
        precs = [PRECISIONS.get(prec, prec)] if dot else list(THRESHOLDS)
        for p in precs:
            if p not in THRESHOLDS:
                raise ConfigError(f"unknown precision {prec!r} in {item!r}", field="--threshold",
                                  fix=f"use one of {sorted(THRESHOLDS)}")
            if metric not in THRESHOLDS[p]:
                raise ConfigError(f"unknown metric {metric!r} in {item!r}", field="--threshold",
                                  fix=f"use one of {sorted(THRESHOLDS[p])}")
            try:
                out.setdefault(p, {})[metric] = float(value)
            except ValueError:
                raise ConfigError(f"value {value!r} in {item!r} is not a number", field="--threshold") from None
    return out


def thresholds(overrides: dict[str, dict[str, float]] | None = None) -> dict[str, dict[str, float]]:
    """The thresholds with ``overrides`` applied (the defaults are never modified)."""
    out = copy.deepcopy(THRESHOLDS)
    for p, metrics in (overrides or {}).items():
        out[p].update(metrics)
    return out


def check(metrics: dict[str, float], limits: dict[str, float]) -> list[str]:
    """Names of the failed checks, as readable strings ('max_abs_logit 0.3 > 0.001'). NaN metrics
    (a check that was not run) are skipped."""
    failed = []
    for name, limit in limits.items():
        metric = name.removeprefix("max_").removeprefix("min_")
        v = metrics.get(metric)
        if v is None or v != v:
            continue
        if name.startswith("min_") and v < limit:
            failed.append(f"{metric} {v:.4g} < {limit:.4g}")
        elif name.startswith("max_") and v > limit:
            failed.append(f"{metric} {v:.4g} > {limit:.4g}")
    return failed
