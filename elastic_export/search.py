"""Budget search without training (the pruning baseline): parameter targets -> subnets from the ranks.

A target is ``75%`` (of the parent's parameters), ``9B`` / ``6.5B`` / ``300M`` / ``120K`` / an
integer (parameters), or a JSON file holding a subnet (``Subnet.to_dict``). ``NAME=SPEC`` names it;
otherwise ``9B`` is named ``9B`` and ``75%`` ``75pct``. The target is an upper bound. For a MoE
parent ``TOTAL/ACTIVE`` (``23B/2.8B``, ``75%/60%``) bounds the active parameters too (per token: the
routed experts counted top-k times, accounting.count_active_params); it is named ``23B-A2.8B``. A
total of ``100%`` bounds the active parameters alone.

Knobs and their choices (every choice respects the constraints):
- embedding width d_e: multiples of ``embed_divisor`` (64 at scale);
- FFN neurons: multiples of ``ffn_divisor``; Mamba heads: multiples of n_groups (the same count in
  every group); Mamba head channels: multiples of ``channel_step``; attention heads: multiples of
  num_key_value_heads. Homogeneous mode has one knob per axis; heterogeneous mode one per layer
  (the embedding width stays global);
- MoE: routed experts kept (multiples of ``n_group`` with at least two per group, the same count in
  every group; steps of ``expert_step``), each expert's neurons (multiples of ``ffn_divisor``) and the
  shared expert's. Expert scores are REAP (importance.py), the expert-neuron retained mass is that of
  the neuron scores summed over experts;
- depth: the number of layers dropped along the depth ranking (only with depth ranks).

Our choice of objective (the paper trains a router instead): minimize sum_k w_k * (u_k + u_k^2),
u_k = -log(retained_k), where retained_k is the importance mass a knob keeps (the prefix of its
sorted scores over their total; the kept fraction when no scores are given) and w_k the share of
the parent's parameters the knob acts on. The log term alone is flat between cutting the embedding
width and cutting every other axis in proportion; the square makes the cut spread over the axes.
Greedy: repeatedly take the one-step shrink with the smallest loss per parameter saved until the
budget fits, then grow back any knob that still fits (largest gain per parameter first). With an
active target too, a step's saving is the sum over the bounds still exceeded of its saving relative
to that bound (total and active parameters alike), and growing back must keep both. With
uniform scores all axes shrink about evenly; with scores, axes whose tail carries little
importance shrink first.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .accounting import active_layer_params, count_active_params, count_params, embedding_params, layer_params
from .config import ModelConfig
from .elastic import LayerWidths, Subnet, full_subnet, validate_subnet
from .errors import BudgetError

MODES = ("homogeneous", "heterogeneous")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
UNITS = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


# ---- targets ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    name: str
    spec: str
    params: int | None = None  # a parameter target, or
    subnet: Subnet | None = None  # an explicit subnet
    active: int | None = None  # MoE: a bound on the active parameters too


def parse_budget(spec: str, cfg: ModelConfig) -> Target:
    """``75%``, ``9B``, ``NAME=SPEC`` or ``[NAME=]subnet.json`` -> a Target (checked against the parent)."""
    spec = spec.strip()
    name, _, value = spec.rpartition("=") if "=" in spec else ("", "", spec)
    value = value.strip()
    full = count_params(cfg)
    if value.endswith(".json"):
        path = Path(value)
        name = name or path.stem
        try:
            subnet = Subnet.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise BudgetError("subnet file not found", path=path) from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise BudgetError(f"is not a subnet JSON ({e})", path=path,
                              fix='write {"hidden": D, "layers": [{"kept": true, ...}, ...]}') from None
        _check_name(name, spec)
        validate_subnet(cfg, subnet, where=f"budget {name}")
        return Target(name, spec, subnet=subnet)
    total_spec, _, active_spec = value.partition("/")
    params, auto = _amount(total_spec, full, spec)
    active = None
    if active_spec:
        if not cfg.has_moe:
            raise BudgetError(f"budget {spec!r} bounds active parameters, but the parent has no MoE layers "
                              "(every parameter is active)", field="--budget", fix="give the total alone")
        full_active = count_active_params(cfg)
        active, auto_a = _amount(active_spec, full_active, spec)
        auto = f"{auto}-A{auto_a}"
        if active > full_active:
            raise BudgetError(f"budget {spec!r} asks for {active:,} active parameters, more than the parent's "
                              f"{full_active:,}", field="--budget", fix="give an active bound no larger than the parent's")
    name = name or auto
    _check_name(name, spec)
    if params > full:
        raise BudgetError(f"budget {name!r} asks for {params:,} parameters, more than the parent's {full:,}",
                          field="--budget", fix="give a budget no larger than the parent (at most 100%)")
    if params <= 0 or active is not None and active <= 0:
        raise BudgetError(f"budget {name!r} asks for no parameters", field="--budget")
    return Target(name, spec, params=params, active=active)


def _amount(value: str, full: int, spec: str) -> tuple[int, str]:
    """``75%`` / ``9B`` / an integer -> (parameters, default name)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(%|[KMBGT]?)", value.strip(), flags=re.IGNORECASE)
    if not m:
        raise BudgetError(f"cannot read budget {spec!r}", field="--budget",
                          fix="use a percentage (75%), a parameter count (9B, 300M), NAME=SPEC, a subnet .json, or "
                              "TOTAL/ACTIVE for a MoE parent (23B/2.8B)")
    number, unit = float(m.group(1)), m.group(2).upper()
    if unit == "%":
        return int(full * number / 100), f"{m.group(1)}pct"
    return int(number * UNITS.get(unit, 1)), value.strip()


def _check_name(name: str, spec: str) -> None:
    if not NAME_RE.match(name):
        raise BudgetError(f"budget name {name!r} (from {spec!r}) is not usable as a file name", field="--budget",
                          fix="name it explicitly: NAME=SPEC with letters, digits, '.', '_' or '-'")


# ---- knobs --------------------------------------------------------------------------------------

def default_divisor(n: int, min_choices: int = 8, largest: int = 64) -> int:
    """The largest power of two (<= ``largest``) dividing n that still leaves ``min_choices`` choices."""
    div = largest
    while div > 1 and (n % div or n // div < min_choices):
        div //= 2
    return div


def _choices(n: int, step: int, least: int = 1) -> list[int]:
    """Allowed widths, largest first: n and every multiple of step below it (at least ``least``)."""
    vals = {n} | {k * step for k in range(1, n // step + 1)}
    return sorted((v for v in vals if max(1, least) <= v <= n), reverse=True)


def expert_choices(E: int, n_group: int, step: int | None = None) -> list[int]:
    """Routed-expert counts of a MoE layer, largest first: multiples of ``step`` (a multiple of n_group;
    default n_group x default_divisor(E / n_group, 16)) keeping at least two experts per group."""
    step = step or n_group * default_divisor(E // n_group, 16)
    return _choices(E, step, 2 * n_group)


def retained_fraction(scores, choices: list[int], full: int | None = None) -> list[float]:
    """Importance kept by each width choice (a prefix of sorted scores), as a fraction of the total.

    Without scores (or with no positive mass) the kept fraction of the width, ``c / full``
    (``full`` defaults to the largest choice).
    """
    full = full or max(choices)
    if scores is None:
        return [c / full for c in choices]
    s = [max(0.0, float(v)) for v in scores]
    total = sum(s)
    if total <= 0:
        return [c / full for c in choices]
    prefix = [0.0]
    for v in s:
        prefix.append(prefix[-1] + v)
    return [prefix[c] / total for c in choices]


def depth_retained(depth_scores, order: list[int], dropped: list[int]) -> list[float]:
    """Depth importance kept when dropping the first k layers of ``order`` (least important first), for
    each k in ``dropped``, as a fraction of the total (the kept share of layers without scores)."""
    L = len(order)
    ds = [] if depth_scores is None else [max(0.0, float(depth_scores[j])) for j in order]
    tot = sum(ds)
    return [1 - sum(ds[:k]) / tot if tot > 0 else 1 - k / L for k in dropped]


def objective(weight: float, retained: float) -> float:
    """The search's loss of one knob: w * (u + u^2), u = -log(retained importance) (see the module doc)."""
    u = -math.log(max(retained, 1e-300))
    return weight * (u + u * u)


@dataclass
class _Knob:
    name: str
    field: str  # "hidden", "depth" or a LayerWidths field
    layers: list[int]  # layers it sets (empty for hidden and depth)
    choices: list
    retained: list[float]
    weight: float
    idx: int = 0


class _Search:
    def __init__(self, cfg: ModelConfig, mode: str, importance=None, embed_divisor: int | None = None,
                 ffn_divisor: int | None = None, channel_step: int | None = None, depth: bool | None = None,
                 expert_step: int | None = None):
        if mode not in MODES:
            raise BudgetError(f"unknown search mode {mode!r}", field="mode", fix=f"use one of {MODES}")
        self.cfg = cfg
        full = full_subnet(cfg)
        self.full = full
        total = count_params(cfg)
        lp_full = [layer_params(cfg, i, cfg.hidden_size, w) for i, w in enumerate(full.layers)]
        imp = importance
        types = cfg.layers_block_type
        knobs: list[_Knob] = []
        D = cfg.hidden_size
        dch = _choices(D, embed_divisor or default_divisor(D))
        hidden_scores = None if imp is None else imp.hidden
        knobs.append(_Knob("hidden", "hidden", [], dch, retained_fraction(hidden_scores, dch), 1.0))

        def add(kind, field, layers, n, step, scores_of, ch=None):
            ch = ch or _choices(n, step)
            share = sum(lp_full[i] for i in layers) / total
            if mode == "homogeneous":
                rs = [retained_fraction(scores_of(i), ch) for i in layers]
                ret = [math.prod(r[k] for r in rs) ** (1 / len(rs)) for k in range(len(ch))]  # geometric mean
                knobs.append(_Knob(kind, field, layers, ch, ret, share))
            else:
                for i in layers:
                    knobs.append(_Knob(f"{kind}[{i}]", field, [i], ch, retained_fraction(scores_of(i), ch),
                                       lp_full[i] / total))

        def scores(key):
            return lambda i: None if imp is None else imp.layers[i][key]

        by_type = {t: [i for i, x in enumerate(types) if x == t] for t in set(types)}
        dims = [cfg.layer_dims(i) for i in range(cfg.num_hidden_layers)]
        self._homogeneous_widths_check(by_type, dims, mode)
        if "mlp" in by_type:
            f = dims[by_type["mlp"][0]]["intermediate_size"]
            add("ffn", "ffn", by_type["mlp"], f, ffn_divisor or default_divisor(f), scores("ffn"))
        if "linear_attention" in by_type:
            ls = by_type["linear_attention"]
            H, P = dims[ls[0]]["mamba_num_heads"], dims[ls[0]]["mamba_head_dim"]
            add("mamba_heads", "mamba_heads", ls, H, cfg.n_groups, scores("heads"))
            add("mamba_head_dim", "mamba_head_dim", ls, P, channel_step or default_divisor(P, 8, 8),
                scores("channels"))
        if "full_attention" in by_type:
            ls = by_type["full_attention"]
            add("attn_heads", "attn_heads", ls, dims[ls[0]]["num_attention_heads"], cfg.num_key_value_heads,
                scores("heads"))
        if "moe" in by_type:
            ls = by_type["moe"]
            E, f, sf = (dims[ls[0]][k] for k in ("n_routed_experts", "moe_intermediate_size",
                                                 "moe_shared_expert_intermediate_size"))
            if expert_step is not None and expert_step % cfg.n_group:
                raise BudgetError(f"expert step {expert_step} is not a multiple of n_group={cfg.n_group}",
                                  field="expert_step", fix=f"use a multiple of {cfg.n_group}")
            add("experts", "experts", ls, E, None, scores("experts"), expert_choices(E, cfg.n_group, expert_step))
            add("expert_ffn", "expert_ffn", ls, f, ffn_divisor or default_divisor(f),
                lambda i: None if imp is None else imp.layers[i]["expert_ffn"].sum(0))
            add("shared_ffn", "shared_ffn", ls, sf, ffn_divisor or default_divisor(sf), scores("shared_ffn"))
        has_depth = imp is not None and imp.depth_order is not None
        if depth and not has_depth:
            raise BudgetError("depth pruning needs depth ranks", field="--depth",
                              fix="rank the parent first (elastic-export rank), or pass --no-depth")
        self.depth_order = list(imp.depth_order) if has_depth else []
        if (depth is None and has_depth) or depth:
            L = cfg.num_hidden_layers
            ch = list(range(L))  # layers dropped
            ret = depth_retained(imp.depth, self.depth_order, ch)
            knobs.append(_Knob("depth", "depth", [], ch, ret, sum(lp_full) / total))
        self.knobs = knobs
        self._layers_of = {k.name: set(k.layers) for k in knobs}

    def _homogeneous_widths_check(self, by_type, dims, mode):
        keys = {"mlp": ("intermediate_size",), "linear_attention": ("mamba_num_heads", "mamba_head_dim"),
                "full_attention": ("num_attention_heads",),
                "moe": ("n_routed_experts", "moe_intermediate_size", "moe_shared_expert_intermediate_size")}
        for t, ls in by_type.items():
            for k in keys[t]:
                if len({dims[i][k] for i in ls}) > 1:
                    raise BudgetError(f"the parent is heterogeneous ({k} differs across layers)", field="parent",
                                      fix="search budgets on the homogeneous parent, not on a slice")

    # -- state: embedding width, per-layer widths and kept flags; parameters (total and active) kept
    # incrementally
    def _reset(self):
        cfg = self.cfg
        self.d = cfg.hidden_size
        self.widths = [{k: v for k, v in w.to_dict().items() if k != "kept"} for w in self.full.layers]
        self.kept = [True] * cfg.num_hidden_layers
        self.lp, self.la = map(list, zip(*(self._layer(i, self.d, self.widths[i], True)
                                           for i in range(cfg.num_hidden_layers))))
        self.total = embedding_params(cfg, self.d) + sum(self.lp)
        self.active = embedding_params(cfg, self.d) + sum(self.la)
        for k in self.knobs:
            k.idx = 0

    def _layer(self, i, d, widths, kept) -> tuple[int, int]:
        """(parameters, active parameters) of layer i."""
        if not kept:
            return 0, 0
        w = LayerWidths(kept, **widths)
        return layer_params(self.cfg, i, d, w), active_layer_params(self.cfg, i, d, w)

    def _trial(self, k: _Knob, j: int) -> tuple[int, int, dict]:
        """(parameters, active parameters) after setting knob k to choice j, and the per-layer changes
        {i: (widths, kept, params, active)}."""
        v = k.choices[j]
        changes = {}
        if k.field == "hidden":
            for i in range(len(self.lp)):
                changes[i] = (self.widths[i], self.kept[i], *self._layer(i, v, self.widths[i], self.kept[i]))
            emb = embedding_params(self.cfg, v)
            return emb + sum(c[2] for c in changes.values()), emb + sum(c[3] for c in changes.values()), changes
        if k.field == "depth":
            dropped = set(self.depth_order[:v])
            for i in range(len(self.lp)):
                if (i not in dropped) != self.kept[i]:
                    changes[i] = (self.widths[i], i not in dropped,
                                  *self._layer(i, self.d, self.widths[i], i not in dropped))
        else:
            for i in k.layers:
                w = {**self.widths[i], k.field: v}
                changes[i] = (w, self.kept[i], *self._layer(i, self.d, w, self.kept[i]))
        return (self.total + sum(c[2] - self.lp[i] for i, c in changes.items()),
                self.active + sum(c[3] - self.la[i] for i, c in changes.items()), changes)

    def _commit(self, k: _Knob, j: int) -> None:
        total, active, changes = self._trial(k, j)
        for i, (w, kept, p, a) in changes.items():
            self.widths[i], self.kept[i], self.lp[i], self.la[i] = w, kept, p, a
        if k.field == "hidden":
            self.d = k.choices[j]
        k.idx = j
        self.total, self.active = total, active

    def subnet(self) -> Subnet:
        return Subnet(self.d, tuple(LayerWidths(kept, **w) for w, kept in zip(self.widths, self.kept)))

    @staticmethod
    def _cost(k: _Knob, j: int) -> float:
        """Objective loss of knob k at choice j: w * (u + u^2), u = -log(retained importance)."""
        return objective(k.weight, k.retained[j])

    def _saving(self, dp: int, da: int, target: int, active: int | None) -> float:
        """A shrink's saving: parameters (a total target alone, as for dense models), else the sum over
        the bounds still exceeded of the saving relative to the bound."""
        if active is None:
            return dp
        return (dp / target if self.total > target else 0.0) + (da / active if self.active > active else 0.0)

    def run(self, target: int, active: int | None = None) -> Subnet:
        self._reset()
        cache: dict[str, tuple[float, int, int]] = {}

        def over():
            return self.total > target or (active is not None and self.active > active)

        while over():
            best = None
            for k in self.knobs:
                if k.idx + 1 >= len(k.choices):
                    continue
                if k.name not in cache:
                    p, a, _ = self._trial(k, k.idx + 1)
                    if k.field == "depth" and k.choices[k.idx + 1] >= len(self.lp):
                        continue
                    cache[k.name] = (self._cost(k, k.idx + 1) - self._cost(k, k.idx), self.total - p, self.active - a)
                cost, dp, da = cache[k.name]
                saving = self._saving(dp, da, target, active)
                if saving <= 0:
                    continue
                ratio = cost / saving
                if best is None or ratio < best[0]:
                    best = (ratio, k)
            if best is None:
                what = f"{target:,} parameters" + ("" if active is None else f" ({active:,} active)")
                raise BudgetError(f"cannot reach {what}: the smallest subnet under the constraints "
                                  f"has {self.total:,}" + ("" if active is None else f" ({self.active:,} active)"),
                                  field="--budget", fix="give a larger budget")
            k = best[1]
            self._commit(k, k.idx + 1)
            # the embedding width and depth change every knob's saving; a layer knob those sharing its layers
            cache = {} if k.field in ("hidden", "depth") else \
                {n: v for n, v in cache.items() if n not in (k.name, "hidden", "depth")
                 and not self._shares_layers(n, k)}
        # grow back what still fits, largest objective gain per parameter first
        while True:
            best = None
            for k in self.knobs:
                if k.idx == 0:
                    continue
                p, a, _ = self._trial(k, k.idx - 1)
                gain = self._cost(k, k.idx) - self._cost(k, k.idx - 1)
                if p > target or (active is not None and a > active) or gain <= 0:
                    continue
                added = max(1, p - self.total) if active is None else \
                    max(1e-12, (p - self.total) / target + (a - self.active) / active)
                score = gain / added
                if best is None or score > best[0]:
                    best = (score, k)
            if best is None:
                break
            self._commit(best[1], best[1].idx - 1)
        return self.subnet()

    def _shares_layers(self, name: str, k: _Knob) -> bool:
        return bool(self._layers_of[name] & self._layers_of[k.name])


def search_subnet(cfg: ModelConfig, target_params: int, mode: str = "homogeneous", importance=None,
                  embed_divisor: int | None = None, ffn_divisor: int | None = None,
                  channel_step: int | None = None, depth: bool | None = None, active_params: int | None = None,
                  expert_step: int | None = None) -> Subnet:
    """The subnet with at most ``target_params`` parameters (and at most ``active_params`` active ones,
    when given) chosen from the ranks (see module doc).

    ``importance`` must be indexed like the sorted weights (as :func:`sorting.sort_model` returns it);
    None treats every component alike. ``depth`` None: prune depth when depth ranks are given.
    """
    full = count_params(cfg)
    if target_params > full:
        raise BudgetError(f"target {target_params:,} parameters is more than the parent's {full:,}",
                          field="--budget", fix="give a budget no larger than the parent")
    if target_params == full and (active_params is None or active_params >= count_active_params(cfg)):
        return full_subnet(cfg)
    s = _Search(cfg, mode, importance, embed_divisor, ffn_divisor, channel_step, depth, expert_step)
    return s.run(target_params, active_params)


def plan_budgets(cfg: ModelConfig, specs: list[str], mode: str = "homogeneous", importance=None,
                 **search_kw) -> dict[str, Subnet]:
    """Budgets by name, largest first, "full" (the parent) included."""
    out: dict[str, Subnet] = {"full": full_subnet(cfg)}
    for spec in specs:
        t = parse_budget(spec, cfg)
        if t.name in out:
            raise BudgetError(f"budget name {t.name!r} is given twice", field="--budget",
                              fix="name budgets uniquely with NAME=SPEC" if t.name != "full" else
                              "'full' is the parent itself; name the budget otherwise")
        out[t.name] = t.subnet if t.subnet is not None else \
            search_subnet(cfg, t.params, mode, importance, active_params=t.active, **search_kw)
    return dict(sorted(out.items(), key=lambda kv: -count_params(cfg, kv[1])))


# ---- the plan as text ---------------------------------------------------------------------------

def describe(cfg: ModelConfig, s: Subnet) -> str:
    """One line: embedding width, per-type widths (ranges when heterogeneous), kept layers."""
    types = cfg.layers_block_type
    kept = [i for i, w in enumerate(s.layers) if w.kept]

    def rng(vals):
        vals = sorted(set(vals))
        return "-" if not vals else str(vals[0]) if len(vals) == 1 else f"{vals[0]}..{vals[-1]}"

    mh = [s.layers[i].mamba_heads for i in kept if types[i] == "linear_attention"]
    md = [s.layers[i].mamba_head_dim for i in kept if types[i] == "linear_attention"]
    ah = [s.layers[i].attn_heads for i in kept if types[i] == "full_attention"]
    ff = [s.layers[i].ffn for i in kept if types[i] == "mlp"]
    moe = [s.layers[i] for i in kept if types[i] == "moe"]
    experts = "" if not moe else (f", experts {rng([w.experts for w in moe])} x ffn {rng([w.expert_ffn for w in moe])}"
                                  f", shared {rng([w.shared_ffn for w in moe])}")
    dropped = [i for i, w in enumerate(s.layers) if not w.kept]
    return (f"hidden {s.hidden}, mamba {rng(mh)} heads x {rng(md)}, attn {rng(ah)} heads, ffn {rng(ff)}{experts}, "
            f"layers {len(kept)}/{len(types)}" + (f" (dropped {dropped})" if dropped else ""))


def plan_text(cfg: ModelConfig, budgets: dict[str, Subnet], dtype: str = "bfloat16", context: int = 8192,
              batch: int = 1) -> str:
    from .accounting import family_weights, memory
    from .inspect import human

    def gb(n):
        return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"

    names = list(budgets)
    full = count_params(cfg)
    lines = ["budgets:"]
    for n in names:
        p = count_params(cfg, budgets[n])
        active = ""
        if cfg.has_moe:  # per token: the routed experts counted top-k times
            a = count_active_params(cfg, budgets[n])
            active = f" active {human(a):>8} ({100 * a / count_active_params(cfg):5.1f}%)"
        lines.append(f"  {n:<10} {human(p):>8} ({100 * p / full:5.1f}%){active}  {describe(cfg, budgets[n])}")
    lines += ["", f"memory at {dtype}, context {context}, batch {batch} (SSM state float32):",
              f"  {'budget':<10} {'params':>8} {'weights':>10} {'KV cache':>10} {'SSM+conv':>10} "
              f"{'activations':>11} {'total':>10}"]
    for n in names:
        m = memory(cfg, budgets[n], dtype, context, batch)
        lines.append(f"  {n:<10} {human(m.params):>8} {gb(m.weights):>10} {gb(m.kv_cache):>10} "
                     f"{gb(m.ssm_state + m.conv_state):>10} {gb(m.activations):>11} {gb(m.total):>10}")
    fam = family_weights(cfg, [budgets[n] for n in names], dtype)
    lines += ["", f"weights of the family at {dtype}:",
              f"  nested (one copy, all {len(names)} budgets): {gb(fam['nested'])}"]
    for k in range(2, len(names) + 1):
        lines.append(f"  separate {' + '.join(names[:k])}: {gb(sum(fam['per_budget'][:k]))}")
    return "\n".join(lines)
