"""The router's search space: elastic axes, their choices, and the cost (parameters or memory) of a choice.

An axis is one elastic dimension of the model (METHOD.md "Elastic axes"):

| axis             | rows                         | choice values                            |
| ---------------- | ---------------------------- | ---------------------------------------- |
| ``embedding``    | 1 (global)                   | embedding width d_e                      |
| ``mamba_heads``  | one per Mamba layer          | heads (a multiple of n_groups)           |
| ``mamba_head_dim`` | one per Mamba layer        | channels per head                        |
| ``attn_heads``   | one per attention layer      | query heads (a multiple of the KV heads) |
| ``ffn``          | one per MLP layer            | FFN neurons                              |
| ``experts``      | one per MoE layer            | routed experts kept (a multiple of n_group, at least 2 per group) |
| ``expert_ffn``   | one per MoE layer            | neurons of each routed expert            |
| ``shared_ffn``   | one per MoE layer            | neurons of the shared expert             |
| ``depth``        | 1 (global)                   | layers dropped along the depth ranking   |

Heterogeneous mode has one row per layer; homogeneous mode one row shared by the axis's layers.
Width choices are fractions of each layer's full width (``width_choices``), rounded to the axis's
multiple; every row has the same number of choices. Rounding may repeat a value (heads [4, 4, 6, 8, 8]):
such duplicates are masked out (``Axis.valid``), so the router's prior does not count a width twice.

:meth:`ElasticSpace.repair` moves a configuration into its budget's tolerance band by single grid
steps chosen by importance (the objective of ``elastic_export.search``), optionally under an upper bound
per row (a larger budget's choice), which keeps budgets nested in each other.

Costs are written in terms of widths so that the same function takes Python ints (an exact count for
a ``Subnet``) or tensors (the router's straight-through widths, differentiable). Metrics: ``params``
(total parameters), ``active`` (per token: a MoE layer's routed experts counted top-k times, top-k
= min(num_experts_per_tok, topk_group * experts / n_group) as elastic.moe_top_k, piecewise linear in
the expected expert count), ``memory`` (bytes at a context length). Exact counts of a Subnet come from
``elastic_export.accounting``; tests check this differentiable count against it and the weight views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from elastic_export.elastic import LayerWidths, Subnet

AXES = ("embedding", "mamba_heads", "mamba_head_dim", "attn_heads", "ffn", "experts", "expert_ffn", "shared_ffn",
        "depth")
LAYER_AXES = {"linear_attention": ("mamba_heads", "mamba_head_dim"), "full_attention": ("attn_heads",),
              "mlp": ("ffn",), "moe": ("experts", "expert_ffn", "shared_ffn")}
AXIS_TYPE = {"mamba_heads": "linear_attention", "mamba_head_dim": "linear_attention",
             "attn_heads": "full_attention", "ffn": "mlp", "experts": "moe", "expert_ffn": "moe", "shared_ffn": "moe"}
WIDTH_KEY = {"mamba_heads": "mamba_num_heads", "mamba_head_dim": "mamba_head_dim",
             "attn_heads": "num_attention_heads", "ffn": "intermediate_size", "experts": "n_routed_experts",
             "expert_ffn": "moe_intermediate_size", "shared_ffn": "moe_shared_expert_intermediate_size"}
SCORE_KEY = {"mamba_heads": "heads", "mamba_head_dim": "channels", "attn_heads": "heads", "ffn": "ffn",
             "experts": "experts", "expert_ffn": "expert_ffn", "shared_ffn": "shared_ffn"}  # Importance.layers keys


@dataclass
class Axis:
    name: str
    layers: list[int]  # the layers this axis covers (empty for global axes)
    values: list[list[int]]  # [rows][choices]; a homogeneous per-layer axis has one row
    per_layer: bool  # True: row r belongs to layers[r]; False: one row shared by all its layers

    @property
    def rows(self) -> int:
        return len(self.values)

    @property
    def choices(self) -> int:
        return len(self.values[0])

    def row_of(self, layer: int) -> int:
        return self.layers.index(layer) if self.per_layer else 0

    @property
    def valid(self) -> list[list[bool]]:
        """[rows][choices]: False where a choice repeats an earlier value of its row (after rounding)."""
        return [[v not in row[:k] for k, v in enumerate(row)] for row in self.values]

    def size_key(self, row: int, k: int) -> int:
        """Orders the choices of a row by the size they give: widths grow with the value, depth shrinks."""
        v = self.values[row][k]
        return -v if self.name == "depth" else v


def _round(full: int, frac: float, multiple: int, least: int | None = None) -> int:
    """A fraction of a width, rounded to the axis's multiple (at least ``least``, default the multiple);
    1.0 is always the full width itself."""
    if frac >= 1.0:
        return full
    return min(full, max(least or multiple, round(full * frac / multiple) * multiple))


class ElasticSpace:
    """Axes over a parent config, and the subnet / cost / gates of a choice per axis."""

    def __init__(self, cfg, width_choices=(0.5, 0.625, 0.75, 0.875, 1.0), axes=AXES, heterogeneous: bool = True,
                 max_dropped_layers: int = 0, depth_ranking: list[int] | None = None, embedding_multiple: int = 16):
        self.cfg = cfg
        fracs = sorted(width_choices)
        multiple = {"mamba_heads": cfg.n_groups, "mamba_head_dim": 1, "attn_heads": cfg.num_key_value_heads,
                    "ffn": 1, "experts": cfg.n_group, "expert_ffn": 1, "shared_ffn": 1}
        least = {"experts": 2 * cfg.n_group}  # transformers' grouped router ranks a group by its two best
        self.axes: dict[str, Axis] = {}
        for name in axes:
            if name == "embedding":
                vals = [_round(cfg.hidden_size, f, min(embedding_multiple, cfg.hidden_size)) for f in fracs]
                self.axes[name] = Axis(name, [], [vals], False)
            elif name == "depth":
                if max_dropped_layers > 0:
                    self.axes[name] = Axis(name, [], [list(range(max_dropped_layers + 1))], False)
            else:
                layers = [i for i, t in enumerate(cfg.layers_block_type) if t == AXIS_TYPE[name]]
                if not layers:
                    continue
                rows = [[_round(cfg.layer_dims(i)[WIDTH_KEY[name]], f, multiple[name], least.get(name)) for f in fracs]
                        for i in (layers if heterogeneous else layers[:1])]
                if not heterogeneous and cfg.layer_widths is not None:
                    raise ValueError("homogeneous routing needs a homogeneous parent")
                self.axes[name] = Axis(name, layers, rows, heterogeneous)
        self.depth_ranking = list(depth_ranking) if depth_ranking is not None else \
            list(range(cfg.num_hidden_layers))  # least important first
        if "depth" in self.axes and max_dropped_layers >= cfg.num_hidden_layers:
            raise ValueError("max_dropped_layers must leave at least one layer")

    # ---- widths of a choice --------------------------------------------------------------------
    def widths(self, pick) -> tuple:
        """``pick(axis, row) -> value`` -> (hidden, kept per layer, widths dict per layer)."""
        cfg = self.cfg
        hidden = pick(self.axes["embedding"], 0) if "embedding" in self.axes else cfg.hidden_size
        kept = [1] * cfg.num_hidden_layers
        if "depth" in self.axes:
            ax = self.axes["depth"]
            for k in range(1, ax.choices):  # choice k drops the k least important layers
                for j in self.depth_ranking[:k]:
                    kept[j] = kept[j] - self._indicator(pick, ax, k)
        dims = []
        for i, t in enumerate(cfg.layers_block_type):
            full = cfg.layer_dims(i)
            w = {}
            for name in LAYER_AXES[t]:
                if name in self.axes:
                    ax = self.axes[name]
                    w[name] = pick(ax, ax.row_of(i))
                else:
                    w[name] = full[WIDTH_KEY[name]]
            dims.append(w)
        return hidden, kept, dims

    @staticmethod
    def _indicator(pick, ax, k):
        return pick(ax, 0, k)

    def subnet(self, index: dict[str, torch.Tensor | list]) -> Subnet:
        """Choice indices per axis ([rows] each) -> the Subnet they select."""
        def pick(ax, row, k=None):
            i = int(index[ax.name][row])
            if k is not None:
                return int(i == k)
            return ax.values[row][i]

        hidden, kept, dims = self.widths(pick)
        layers = []
        for t, k, w in zip(self.cfg.layers_block_type, kept, dims):
            layers.append(LayerWidths(kept=bool(k), **{n: int(v) for n, v in w.items()}))
        return Subnet(int(hidden), tuple(layers))

    def soft_widths(self, y: dict[str, torch.Tensor]) -> tuple:
        """Straight-through one-hots per axis ([rows, choices]) -> differentiable widths."""
        def pick(ax, row, k=None):
            if k is not None:
                return y[ax.name][row, k]
            vals = torch.tensor(ax.values[row], dtype=y[ax.name].dtype, device=y[ax.name].device)
            return (y[ax.name][row] * vals).sum()

        return self.widths(pick)

    # ---- cost ----------------------------------------------------------------------------------
    def params(self, hidden, kept, dims):
        """Parameter count of a configuration (ints -> int, tensors -> differentiable tensor)."""
        cfg = self.cfg
        d, V = hidden, cfg.vocab_size
        total = V * d * (1 if cfg.tie_word_embeddings else 2) + d  # embeddings, lm_head, norm_f
        for i, t in enumerate(cfg.layers_block_type):
            total = total + kept[i] * layer_params(cfg, t, d, dims[i])
        return total

    def active_params(self, hidden, kept, dims):
        """Active parameters (per token) of a configuration: MoE layers count top-k routed experts."""
        cfg = self.cfg
        d = hidden
        total = cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2) + d
        for i, t in enumerate(cfg.layers_block_type):
            total = total + kept[i] * layer_params(cfg, t, d, dims[i], active=True)
        return total

    def memory(self, hidden, kept, dims, context: int, bytes_per_param: int = 2):
        """Bytes at batch 1 and ``context`` tokens: weights + KV cache + Mamba conv and SSM state."""
        cfg = self.cfg
        total = self.params(hidden, kept, dims) * bytes_per_param
        GN = cfg.n_groups * cfg.ssm_state_size
        for i, t in enumerate(cfg.layers_block_type):
            w = dims[i]
            if t == "full_attention":
                total = total + kept[i] * 2 * cfg.num_key_value_heads * cfg.head_dim * context * bytes_per_param
            elif t == "linear_attention":
                hp = w["mamba_heads"] * w["mamba_head_dim"]
                total = total + kept[i] * (hp * cfg.ssm_state_size * 4 +
                                           (hp + 2 * GN) * (cfg.conv_kernel - 1) * bytes_per_param)
        return total

    def cost(self, config, metric: str = "params", context: int = 4096):
        if metric == "params":
            return self.params(*config)
        if metric == "active":
            return self.active_params(*config)
        return self.memory(*config, context=context)

    def subnet_cost(self, subnet: Subnet, metric: str = "params", context: int = 4096) -> int:
        if metric in ("params", "active"):
            from elastic_export.accounting import count_active_params, count_params

            return (count_params if metric == "params" else count_active_params)(self.cfg, subnet)
        dims = [{n: getattr(w, n) for n in LAYER_AXES[t]} for t, w in zip(self.cfg.layers_block_type, subnet.layers)]
        return int(self.cost((subnet.hidden, [int(w.kept) for w in subnet.layers], dims), metric, context))

    def extreme_index(self, largest: bool) -> dict[str, list[int]]:
        """Indices of the largest (or smallest) choice on every axis (depth: fewest / most dropped)."""
        out = {}
        for name, ax in self.axes.items():
            best = []
            for r, ok in enumerate(ax.valid):
                order = sorted((k for k in range(ax.choices) if ok[k]), key=lambda k: ax.size_key(r, k))
                best.append(order[-1] if largest else order[0])
            out[name] = best
        return out

    # ---- expected cost and the final repair -----------------------------------------------------
    def expected_widths(self, probs: dict[str, torch.Tensor]) -> tuple:
        """Router probabilities per axis ([rows, choices]) -> expected widths (differentiable).

        The budget loss acts on this expected configuration: unlike a straight-through one-hot, its
        gradient does not vanish as the Gumbel temperature falls and the logit scale grows.
        """
        return self.soft_widths(probs)

    def retained(self, imp=None) -> dict[str, list[list[float]]]:
        """Importance mass each choice keeps, per axis [rows][choices] (the kept fraction without scores).

        ``imp``: an ``elastic_export.importance.Importance`` in the weights' current (sorted) order, so that
        a choice keeps a prefix of the scores; homogeneous rows take the geometric mean over their layers.
        """
        from elastic_export.search import depth_retained, retained_fraction

        def scores(name, layer):
            if imp is None:
                return None
            if name == "embedding":
                return imp.hidden
            s = imp.layers[layer][SCORE_KEY[name]]
            return s.sum(0) if name == "expert_ffn" else s  # [E, F]: the neuron mass over every expert

        out = {}
        for name, ax in self.axes.items():
            if name == "depth":
                out[name] = [depth_retained(None if imp is None else imp.depth, self.depth_ranking, ax.values[0])]
                continue
            rows = []
            for r, vals in enumerate(ax.values):
                layers = [None] if name == "embedding" else [ax.layers[r]] if ax.per_layer else ax.layers
                rs = [retained_fraction(scores(name, i), vals, full=self._full_width(name, i)) for i in layers]
                rows.append([math.prod(x[k] for x in rs) ** (1 / len(rs)) for k in range(len(vals))])  # geometric mean
            out[name] = rows
        return out

    def _full_width(self, name: str, layer) -> int:
        return self.cfg.hidden_size if name == "embedding" else self.cfg.layer_dims(layer)[WIDTH_KEY[name]]

    def _weights(self) -> dict[str, list[float]]:
        """Share of the parent's parameters each row acts on (the search objective's w)."""
        cfg = self.cfg
        dims = [{k: cfg.layer_dims(i)[WIDTH_KEY[k]] for k in LAYER_AXES[t]}
                for i, t in enumerate(cfg.layers_block_type)]
        full = [layer_params(cfg, t, cfg.hidden_size, w) for t, w in zip(cfg.layers_block_type, dims)]
        total = float(self.params(cfg.hidden_size, [1] * cfg.num_hidden_layers, dims))
        out = {}
        for name, ax in self.axes.items():
            if name == "embedding":
                out[name] = [1.0]
            elif name == "depth":
                out[name] = [sum(full) / total]
            else:
                out[name] = [(full[ax.layers[r]] if ax.per_layer else sum(full[i] for i in ax.layers)) / total
                             for r in range(ax.rows)]
        return out

    def repair(self, index: dict, target: float, tolerance: float, metric: str = "params", context: int = 4096,
               imp=None, upper: dict | None = None) -> tuple[dict[str, list[int]], bool]:
        """Move a configuration (choice indices per axis) into ``target * (1 +- tolerance)``.

        Deterministic and greedy on the router's grid: while over the band, take the one-step shrink that
        loses the least importance per unit of cost saved (objective ``w * (u + u^2)``, u = -log retained
        importance, as ``elastic_export.search``); then, while under it, the one-step growth that gains the
        most per unit of cost added without leaving the band. ``upper`` (a larger budget's indices) caps
        every row at that budget's size, so the budgets stay nested. Returns (indices, in_band).
        """
        from elastic_export.search import objective

        # a repeated width is the same choice as its first occurrence (the router never picks the repeat)
        idx = {n: [ax.values[r].index(ax.values[r][int(v)]) for r, v in enumerate(index[n])]
               for n, ax in self.axes.items()}
        valid = {n: ax.valid for n, ax in self.axes.items()}
        if upper is not None:  # start inside the bound
            for n, ax in self.axes.items():
                for r in range(ax.rows):
                    if ax.size_key(r, idx[n][r]) > ax.size_key(r, int(upper[n][r])):
                        idx[n][r] = int(upper[n][r])
        ret, wts = self.retained(imp), self._weights()
        lo, hi = target * (1 - tolerance), target * (1 + tolerance)

        def cost(ix):
            return self.subnet_cost(self.subnet(ix), metric, context)

        def neighbour(ix, n, r, grow):
            ax = self.axes[n]
            cur = ax.size_key(r, ix[n][r])
            cand = [k for k in range(ax.choices) if valid[n][r][k] and
                    (ax.size_key(r, k) > cur if grow else ax.size_key(r, k) < cur)]
            if grow and upper is not None:
                cand = [k for k in cand if ax.size_key(r, k) <= ax.size_key(r, int(upper[n][r]))]
            if not cand:
                return None
            return (min if grow else max)(cand, key=lambda k: ax.size_key(r, k))

        def moves(ix, grow, lock=None):  # every one-step change of one row (but ``lock``): (cost, objective change, indices)
            for n, ax in self.axes.items():
                for r in range(ax.rows):
                    if (n, r) == lock:
                        continue
                    k = neighbour(ix, n, r, grow)
                    if k is None:
                        continue
                    trial = {**ix, n: ix[n][:r] + [k] + ix[n][r + 1:]}
                    try:
                        c = cost(trial)
                    except ValueError:
                        continue
                    d_obj = objective(wts[n][r], ret[n][r][k]) - objective(wts[n][r], ret[n][r][ix[n][r]])
                    yield c, d_obj, trial

        def total(ix):  # the objective of a whole configuration
            return sum(objective(wts[n][r], ret[n][r][ix[n][r]]) for n, ax in self.axes.items() for r in range(ax.rows))

        def shrink(ix, c, lock=None):  # cheapest importance per unit of cost saved, until under the band's top
            while c > hi:
                best = None
                for c2, d_obj, trial in moves(ix, grow=False, lock=lock):
                    if c2 < c and (best is None or d_obj / (c - c2) < best[0]):
                        best = (d_obj / (c - c2), c2, trial)
                if best is None:
                    break
                _, c, ix = best
            return ix, c

        def fill(ix, c):  # largest importance gain per unit of cost added, staying in the band
            while c < lo:
                best = None
                for c2, d_obj, trial in moves(ix, grow=True):
                    if c < c2 <= hi and (best is None or -d_obj / (c2 - c) > best[0]):
                        best = (-d_obj / (c2 - c), c2, trial)
                if best is None:
                    break
                _, c, ix = best
            return ix, c

        idx, c = fill(*shrink(idx, cost(idx)))
        for _ in range(4 * sum(ax.rows for ax in self.axes.values())):
            if c >= lo:
                break
            # stuck under the band (every single growth overshoots it): grow one row past the top, shrink
            # the others back, keep the result in band with the best objective (else the largest one)
            cands = []
            for c2, _, trial in moves(idx, grow=True):
                t, tc = fill(*shrink(trial, c2))
                if c < tc <= hi:
                    cands.append((lo <= tc, -total(t) if lo <= tc else tc, tc, t))
            if not cands:  # every shrink undid its growth (a coarse grid): grow a row, shrink the others only
                for c2, _, trial in moves(idx, grow=True):
                    lock = next((n, r) for n in trial for r in range(len(trial[n])) if trial[n][r] != idx[n][r])
                    t, tc = fill(*shrink(trial, c2, lock=lock))
                    if lo <= tc <= hi:
                        cands.append((True, -total(t), tc, t))
            if not cands:
                break
            _, _, c, idx = max(cands, key=lambda x: (x[0], x[1]))
        return idx, lo <= c <= hi

    # ---- gates: the hard mask's straight-through scalars ---------------------------------------
    def gates(self, y: dict[str, torch.Tensor], index: dict[str, torch.Tensor]) -> tuple:
        """(embedding gate, per-layer gates): the chosen entries of the straight-through one-hots.

        Each is exactly 1 in the forward and carries the chosen probability's gradient (METHOD.md,
        hard mode): a layer's gate is the product of the gates of the axes that shape it, times the
        depth gate for kept layers.
        """
        def chosen(name, row):
            return y[name][row, index[name][row]]

        emb = chosen("embedding", 0) if "embedding" in self.axes else None
        depth = chosen("depth", 0) if "depth" in self.axes else None
        layer_gates = []
        for i, t in enumerate(self.cfg.layers_block_type):
            g = depth
            for name in LAYER_AXES[t]:
                if name in self.axes:
                    v = chosen(name, self.axes[name].row_of(i))
                    g = v if g is None else g * v
            layer_gates.append(g)
        return emb, layer_gates


def moe_top_k(cfg, experts):
    """elastic.moe_top_k for ints, and its piecewise-linear form for the router's expected expert count."""
    if isinstance(experts, torch.Tensor):
        return torch.clamp(cfg.topk_group * experts / cfg.n_group, max=cfg.num_experts_per_tok)
    from elastic_export.elastic import moe_top_k as exact

    return exact(cfg, experts)


def layer_params(cfg, layer_type: str, d, w: dict, active: bool = False):
    """Parameters of one layer (its pre-norm included) at embedding width d and widths w; ``active``: a
    MoE layer's routed experts counted top-k times (what one token computes with)."""
    if layer_type == "moe":  # the same terms as accounting.moe_params, in widths that may be tensors
        e, f, sh, mb = w["experts"], w["expert_ffn"], w["shared_ffn"], int(cfg.mlp_bias)
        L = cfg.moe_latent_size
        din = d if L is None else L
        routed = moe_top_k(cfg, e) if active else e
        n = e * d + routed * 2 * f * din + 2 * sh * d + mb * (sh + d) + d
        return n if L is None else n + 2 * L * d + mb * (L + d)
    bias = int(cfg.use_bias)
    if layer_type == "linear_attention":
        h, p = w["mamba_heads"], w["mamba_head_dim"]
        GN, K = cfg.n_groups * cfg.ssm_state_size, cfg.conv_kernel
        rows = 2 * h * p + 2 * GN + h
        conv = (h * p + 2 * GN) * (K + int(cfg.use_conv_bias))
        return rows * d + bias * rows + conv + 3 * h + h * p + d * h * p + bias * d + d
    if layer_type == "full_attention":
        h, hd, nkv = w["attn_heads"], cfg.head_dim, cfg.num_key_value_heads
        return (h * hd + 2 * nkv * hd) * d + d * h * hd + d  # no attention biases (model.Attention)
    f, mb = w["ffn"], int(cfg.mlp_bias)
    return 2 * f * d + mb * (f + d) + d
