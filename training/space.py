"""The router's search space: elastic axes, their choices, and the cost (parameters or memory) of a choice.

An axis is one elastic dimension of the model (METHOD.md "Elastic axes"):

| axis             | rows                         | choice values                            |
| ---------------- | ---------------------------- | ---------------------------------------- |
| ``embedding``    | 1 (global)                   | embedding width d_e                      |
| ``mamba_heads``  | one per Mamba layer          | heads (a multiple of n_groups)           |
| ``mamba_head_dim`` | one per Mamba layer        | channels per head                        |
| ``attn_heads``   | one per attention layer      | query heads (a multiple of the KV heads) |
| ``ffn``          | one per MLP layer            | FFN neurons                              |
| ``depth``        | 1 (global)                   | layers dropped along the depth ranking   |

Heterogeneous mode has one row per layer; homogeneous mode one row shared by the axis's layers.
Width choices are fractions of each layer's full width (``width_choices``), rounded to the axis's
multiple; every row has the same number of choices (rounding may repeat a value, which is harmless).

Costs are written in terms of widths so that the same function takes Python ints (an exact count for
a ``Subnet``) or tensors (the router's straight-through widths, differentiable). Exact counts of a Subnet come from
``elastic_export.accounting``; tests check this differentiable count against it and the weight views.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from elastic_export.elastic import LayerWidths, Subnet

AXES = ("embedding", "mamba_heads", "mamba_head_dim", "attn_heads", "ffn", "depth")
LAYER_AXES = {"linear_attention": ("mamba_heads", "mamba_head_dim"), "full_attention": ("attn_heads",),
              "mlp": ("ffn",)}
AXIS_TYPE = {"mamba_heads": "linear_attention", "mamba_head_dim": "linear_attention",
             "attn_heads": "full_attention", "ffn": "mlp"}
WIDTH_KEY = {"mamba_heads": "mamba_num_heads", "mamba_head_dim": "mamba_head_dim",
             "attn_heads": "num_attention_heads", "ffn": "intermediate_size"}


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


def _round(full: int, frac: float, multiple: int) -> int:
    return min(full, max(multiple, round(full * frac / multiple) * multiple))


class ElasticSpace:
    """Axes over a parent config, and the subnet / cost / gates of a choice per axis."""

    def __init__(self, cfg, width_choices=(0.5, 0.625, 0.75, 0.875, 1.0), axes=AXES, heterogeneous: bool = True,
                 max_dropped_layers: int = 0, depth_ranking: list[int] | None = None, embedding_multiple: int = 16):
        self.cfg = cfg
        fracs = sorted(width_choices)
        multiple = {"mamba_heads": cfg.n_groups, "mamba_head_dim": 1, "attn_heads": cfg.num_key_value_heads,
                    "ffn": 1}
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
                rows = [[_round(cfg.layer_dims(i)[WIDTH_KEY[name]], f, multiple[name]) for f in fracs]
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
            layers.append(LayerWidths(kept=bool(k), mamba_heads=w.get("mamba_heads"),
                                      mamba_head_dim=w.get("mamba_head_dim"), attn_heads=w.get("attn_heads"),
                                      ffn=w.get("ffn")))
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
        return self.params(*config) if metric == "params" else self.memory(*config, context=context)

    def subnet_cost(self, subnet: Subnet, metric: str = "params", context: int = 4096) -> int:
        if metric == "params":
            from elastic_export.accounting import count_params

            return count_params(self.cfg, subnet)
        dims = [{"mamba_heads": w.mamba_heads, "mamba_head_dim": w.mamba_head_dim, "attn_heads": w.attn_heads,
                 "ffn": w.ffn} for w in subnet.layers]
        return int(self.cost((subnet.hidden, [int(w.kept) for w in subnet.layers], dims), metric, context))

    def extreme_index(self, largest: bool) -> dict[str, list[int]]:
        """Indices of the largest (or smallest) choice on every axis (depth: fewest / most dropped)."""
        out = {}
        for name, ax in self.axes.items():
            best = []
            for row in ax.values:
                order = sorted(range(len(row)), key=lambda k: row[k])
                best.append(order[-1] if largest != (name == "depth") else order[0])
            out[name] = best
        return out

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


def layer_params(cfg, layer_type: str, d, w: dict):
    """Parameters of one layer (its pre-norm included) at embedding width d and widths w."""
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
