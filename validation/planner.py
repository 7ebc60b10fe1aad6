"""Device planner: which budgets of a family fit a device at a context length, batch and dtype.

Bytes per budget come from :func:`elastic_export.accounting.memory` (the issue-3 accounting; not
re-derived here): weights at the dtype, KV cache of the kept attention layers at the dtype, conv
state at the dtype, SSM state in float32 (at every precision), and the prefill activation estimate
for the whole context at once (the worst case: a chunked prefill needs less; ``prefill_chunk``
plans for that). A budget *fits* when that total is at most the profile's usable memory.

Assumptions (also written into every plan):
- Memory sizes are the documented ones in decimal GB (1 GB = 1e9 bytes). HBM parts (H100, H200,
  A100) physically hold a little more (80 GB HBM3 is 80 GiB), so their figures are conservative.
- A reserve is subtracted for what is not the model: on data-center GPUs the CUDA context, library
  workspaces (cuBLAS, TensorRT) and allocator fragmentation, 1 GB + 5 %; on Jetson boards memory is
  shared with the CPU, so the OS, the CUDA context and the process itself, 1.5 GB + 10 %.
- Serving the nested family from one copy: the full weights stay resident and one budget runs at a
  time, so the family needs the parent's weights plus the largest budget's caches and activations.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from elastic_export.errors import ConfigError

GB = 1e9


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    label: str
    memory_gb: float
    kind: str  # "datacenter" or "edge"
    note: str = ""

    @property
    def reserve_gb(self) -> float:
        return 1.0 + 0.05 * self.memory_gb if self.kind == "datacenter" else 1.5 + 0.10 * self.memory_gb

    @property
    def usable_bytes(self) -> int:
        return int((self.memory_gb - self.reserve_gb) * GB)

    def to_dict(self) -> dict:
        return {**asdict(self), "reserve_gb": round(self.reserve_gb, 3), "usable_gb": self.usable_bytes / GB}


PROFILES: dict[str, DeviceProfile] = {p.name: p for p in [
    DeviceProfile("h100-80gb", "NVIDIA H100 80GB", 80, "datacenter", "HBM3 (SXM) / HBM2e (PCIe)"),
    DeviceProfile("h200-141gb", "NVIDIA H200 141GB", 141, "datacenter", "HBM3e"),
    DeviceProfile("a100-40gb", "NVIDIA A100 40GB", 40, "datacenter", "HBM2"),
    DeviceProfile("a100-80gb", "NVIDIA A100 80GB", 80, "datacenter", "HBM2e"),
    DeviceProfile("l4-24gb", "NVIDIA L4 24GB", 24, "datacenter", "GDDR6"),
    DeviceProfile("orin-nano-8gb", "Jetson Orin Nano 8GB", 8, "edge", "LPDDR5 shared with the CPU; no FP8"),
    DeviceProfile("orin-nx-16gb", "Jetson Orin NX 16GB", 16, "edge", "LPDDR5 shared with the CPU; no FP8"),
    DeviceProfile("agx-orin-32gb", "Jetson AGX Orin 32GB", 32, "edge", "LPDDR5 shared with the CPU; no FP8"),
    DeviceProfile("agx-orin-64gb", "Jetson AGX Orin 64GB", 64, "edge", "LPDDR5 shared with the CPU; no FP8"),
    DeviceProfile("agx-thor-128gb", "Jetson AGX Thor 128GB", 128, "edge", "LPDDR5X shared with the CPU"),
]}
EDGE = [n for n, p in PROFILES.items() if p.kind == "edge"]

ASSUMPTIONS = [
    "memory sizes are the documented ones in decimal GB (1e9 bytes)",
    "reserve: data-center GPU 1 GB + 5% (CUDA context, workspaces, fragmentation); "
    "Jetson (memory shared with the CPU) 1.5 GB + 10% (OS, CUDA context, process)",
    "weights, KV cache, conv state and activations at the dtype; SSM state float32",
    "activations: prefill of the whole context at once (elastic_export.accounting estimate) unless a "
    "prefill chunk is given",
    "nested family: the parent's weights resident once, one budget running at a time",
]


def device_profile(spec: str) -> DeviceProfile:
    """A built-in profile name, or a custom size: ``custom:24``, ``24GB``, ``24`` (decimal GB).

    Custom devices use the data-center reserve; ``edge:8`` uses the edge one.
    """
    key = spec.strip().lower()
    if key in PROFILES:
        return PROFILES[key]
    m = re.fullmatch(r"(?:(custom|edge):)?\s*(\d+(?:\.\d+)?)\s*(gb)?", key)
    if not m or float(m.group(2)) <= 0:
        raise ConfigError(f"unknown device profile {spec!r}", field="--device",
                          fix=f"use one of {', '.join(PROFILES)} or a size such as custom:24 (GB)")
    kind = "edge" if m.group(1) == "edge" else "datacenter"
    size = float(m.group(2))
    return DeviceProfile(f"custom-{size:g}gb", f"custom {size:g} GB", size, kind)


# ---- the plan ------------------------------------------------------------------------------------

def budget_memory(cfg, subnet, dtype: str, context: int, batch: int, prefill_chunk: int | None = None,
                  quant_plan: dict | None = None) -> dict:
    """Bytes of one budget (accounting.memory), activations for ``prefill_chunk`` tokens if given."""
    from elastic_export.accounting import memory

    m = memory(cfg, subnet, dtype, context, batch, quant_plan)
    act = m.activations
    if prefill_chunk is not None and prefill_chunk < context:
        act = memory(cfg, subnet, dtype, prefill_chunk, batch, quant_plan).activations
    total = m.weights + m.kv_cache + m.ssm_state + m.conv_state + act
    return {"params": m.params, "active_params": m.active_params, "weights": m.weights, "kv_cache": m.kv_cache,
            "ssm_state": m.ssm_state,
            "conv_state": m.conv_state, "activations": act, "total": total}


def plan(cfg, budgets: dict, devices: list[str], context: int, batch: int = 1,
         dtypes: tuple[str, ...] = ("bfloat16", "float32"), prefill_chunk: int | None = None,
         quant_plans: dict | None = None) -> dict:
    """For each device, dtype and budget: the bytes needed and whether it fits; plus the family.

    ``budgets``: {name: Subnet}, largest first or not. Returns a JSON-able dict.
    """
    from elastic_export.accounting import count_active_params, count_params, memory

    if context <= 0 or batch <= 0:
        raise ConfigError("context and batch must be positive", field="--context/--batch")
    order = sorted(budgets, key=lambda n: -count_params(cfg, budgets[n]))
    profiles = [device_profile(d) for d in devices]
    out = {"context": context, "batch": batch, "prefill_chunk": prefill_chunk, "assumptions": ASSUMPTIONS,
           "budgets": {n: {"params": count_params(cfg, budgets[n]), "active_params": count_active_params(cfg, budgets[n])}
                       for n in order}, "devices": []}
    for prof in profiles:
        dev = {"profile": prof.to_dict(), "dtypes": {}}
        for dt in dtypes:
            qp = (quant_plans or {}).get(dt)  # int8 / int4 / fp8: the family's quantization blocks
            rows = {n: budget_memory(cfg, budgets[n], dt, context, batch, prefill_chunk, qp) for n in order}
            for r in rows.values():
                r["fits"] = r["total"] <= prof.usable_bytes
            family_weights = memory(cfg, None, dt, quant_plan=qp).weights  # the parent's: one copy serves every budget
            family_total = family_weights + max(r["total"] - r["weights"] for r in rows.values())
            dev["dtypes"][dt] = {
                "budgets": rows,
                "fits": [n for n in order if rows[n]["fits"]],
                "family": {"weights": family_weights, "total": family_total,
                           "fits": family_total <= prof.usable_bytes},
            }
        out["devices"].append(dev)
    return out


def deployment_comparison(cfg, budgets: dict, dtype: str = "bfloat16", pair: tuple[str, ...] | None = None,
                          quant_plan: dict | None = None) -> dict:
    """Weight bytes of the nested family (one copy of the parent) against separate models.

    ``separate_all``: one model per budget; ``separate_pair``: the budgets in ``pair`` only (the
    paper compares the nested 6B + 9B + 12B family with separate 9B + 12B models, the sizes NVIDIA
    released separately). ``pair`` defaults to the two largest budgets.
    """
    from elastic_export.accounting import QUANT_DTYPES, count_params, dtype_bytes, quantized_weight_bytes

    order = sorted(budgets, key=lambda n: -count_params(cfg, budgets[n]))
    pair = tuple(pair or order[:2])
    if dtype in QUANT_DTYPES:  # separate models: each quantized on its own (its own blocks)
        per = {n: quantized_weight_bytes(cfg, budgets[n], dtype) for n in order}
        nested = quantized_weight_bytes(cfg, None, dtype, quant_plan)
    else:
        nb = dtype_bytes(dtype)
        per = {n: count_params(cfg, budgets[n]) * nb for n in order}
        nested = count_params(cfg) * nb
    return {"dtype": dtype, "nested": nested, "per_budget": per,
            "separate_all": sum(per.values()), "pair": list(pair), "separate_pair": sum(per[n] for n in pair)}


def separate_deployments(c: dict) -> list[tuple[list[str], int]]:
    """(budget names, weight bytes) of each separate-models deployment to set beside the family:
    the pair, then every budget, the latter left out when it names the same budgets as the pair."""
    out = [(list(c["pair"]), c["separate_pair"])]
    if sorted(c["pair"]) != sorted(c["per_budget"]):
        out.append((list(c["per_budget"]), c["separate_all"]))
    return out


# ---- text ----------------------------------------------------------------------------------------

def _gb(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def plan_text(p: dict, comparison: dict | None = None) -> str:
    lines = ["budgets: " + ", ".join(f"{n} {_params(v['params'])}" for n, v in p["budgets"].items()), ""]
    if any(v.get("active_params", v["params"]) != v["params"] for v in p["budgets"].values()):
        lines[-1:] = [f"mixture of experts: memory holds every expert, compute runs the active ones", *(
            f"  {n:<10} {_params(v['params'])} parameters in memory, {_params(v['active_params'])} active per token "
            f"(~{2 * v['active_params'] / 1e9:.1f} GFLOP per token in the layers and head)"
            for n, v in p["budgets"].items()), ""]
    if comparison:
        c = comparison
        lines += [f"weights at {c['dtype']}:",
                  f"  nested family ({' + '.join(c['per_budget'])}), one copy: {_gb(c['nested'])}",
                  *(f"  separate {' + '.join(names)}: {_gb(n)}" for names, n in separate_deployments(c)), ""]
    for dev in p["devices"]:
        prof = dev["profile"]
        lines.append(f"{prof['label']}: {prof['memory_gb']:g} GB, usable {prof['usable_gb']:.2f} GB "
                     f"(reserve {prof['reserve_gb']:.2f} GB); context {p['context']}, batch {p['batch']}")
        lines.append(f"  {'dtype':<9} {'budget':<10} {'weights':>10} {'KV':>10} {'SSM+conv':>10} {'activ.':>10} "
                     f"{'total':>10}  fits")
        for dt, d in dev["dtypes"].items():
            for n, r in d["budgets"].items():
                lines.append(f"  {dt:<9} {n:<10} {_gb(r['weights']):>10} {_gb(r['kv_cache']):>10} "
                             f"{_gb(r['ssm_state'] + r['conv_state']):>10} {_gb(r['activations']):>10} "
                             f"{_gb(r['total']):>10}  {'yes' if r['fits'] else 'no'}")
            fam = d["family"]
            lines.append(f"  {dt:<9} {'family':<10} {_gb(fam['weights']):>10} {'':>10} {'':>10} {'':>10} "
                         f"{_gb(fam['total']):>10}  {'yes' if fam['fits'] else 'no'}")
        lines.append("")
    lines.append("assumptions: " + "; ".join(p["assumptions"]))
    return "\n".join(lines)


def fit_table(cfg, budgets: dict, contexts: tuple[int, ...] = (8192, 49152), devices: list[str] | None = None,
              dtype: str = "bfloat16", batch: int = 1) -> dict[str, dict[int, list[str]]]:
    """{device: {context: [budgets that fit]}} (default: the edge profiles, BF16)."""
    devices = devices or EDGE
    out: dict[str, dict[int, list[str]]] = {}
    for ctx in contexts:
        p = plan(cfg, budgets, devices, ctx, batch, (dtype,))
        for dev in p["devices"]:
            name = dev["profile"]["name"]
            out.setdefault(name, {})[ctx] = dev["dtypes"][dtype]["fits"]
    return out
