"""The padded slice layout: a heterogeneous budget as a plain `nemotron_h` checkpoint every reader loads.

A compact slice (:mod:`elastic_export.slicing`) stores each layer at its own widths
(``layer_widths`` in config.json), which only our loader reads. The padded layout gives every layer of a
type the widest kept width of that type (one width per type, a plain config) and fills the extra rows
and columns with zeros, so that the function is unchanged:

- MLP: extra neurons have zero ``up_proj`` rows (and bias) and zero ``down_proj`` columns. Whatever
  act(0) is (relu2(0) = 0, sigmoid(0) = 0.5...), the zero columns of ``down_proj`` drop it.
- MoE: each routed expert's and the shared expert's extra neurons likewise. Expert counts do not pad
  (a zero expert would still be chosen by the router): a budget whose MoE layers keep different
  expert counts is refused in this layout (the compact one holds it).
- attention: extra query heads (the same number in each KV group) have zero ``q_proj`` rows, so they
  attend uniformly, and zero ``o_proj`` columns, which drop what they read.
- Mamba2: extra heads (the same number in each group) and extra head channels have zero z, x and dt
  rows of ``in_proj`` (and bias), zero conv taps and bias, ``dt_bias = A_log = D = 0`` (finite dt and A
  = -1) and zero ``out_proj`` columns. Their gate is silu(z = 0) = 0 (transformers hard-codes SiLU
  there), so they enter the gated RMSNorm as exact zeros whatever ``mamba_hidden_act`` gives for 0.

The one place zeros do not vanish is the gated RMSNorm's mean over a group: a group of n real channels
padded to n_pad computes ``v / sqrt(S / n_pad + eps)`` where the compact slice computes
``v / sqrt(S / n + eps)`` (S the sum of squares of the group's gated values). Scaling that group's norm
weight by ``sqrt(n / n_pad)`` gives

    padded = w sqrt(n / n_pad) v / sqrt(S / n_pad + eps) = w v / sqrt(S / n + k eps),   k = n_pad / n,

so a padded Mamba layer is exactly the compact one with its gated-norm epsilon multiplied by k
(:func:`eps_factors`; k = 1, exact, where a layer is at the widest width). No linear reparametrization
removes the k: it would need padded channels with negative squares, or a way to scale the gated values
y * silu(z), which sit behind SiLUs (conv activation, gate). Each output of the group is scaled by
``sqrt((m + eps) / (m + k eps))`` (m = S / n, the group's mean square), a relative error below
``(k - 1) eps / (m + k eps)`` (:func:`norm_relative_error_bound`). It is small only where m >> eps:
trained models have groups with m near eps (in the shipped model, when this was written, the padded
75% and 50% slices moved the logits by 0.19 and 0.06 against the elastic forward; with eps -> 0, by
1e-5). So a padded slice is exact for MLP and attention padding and for Mamba layers at the widest width, and otherwise
the budget with a larger gated-norm epsilon: ``slice`` says which layers, and ``--layout compact``
keeps the exact function.
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig
from .errors import BudgetError

PADDED, COMPACT = "padded", "compact"
LAYOUTS = (PADDED, COMPACT)


def layout_of(cfg: ModelConfig) -> str:
    """``padded``, ``compact`` or ``plain`` (a homogeneous model: nothing was padded)."""
    if cfg.padded_widths is not None:
        return PADDED
    return COMPACT if cfg.layer_widths is not None else "plain"


def padded_config(cfg: ModelConfig) -> ModelConfig:
    """The plain config of a compact slice: one width per type (the widest kept layer's, as
    :func:`elastic_export.slicing.sliced_config` already sets), the real widths kept as a note."""
    assert cfg.head_order == "group_contiguous", "pad a sliced (group-contiguous) config"
    if cfg.layer_widths is None:
        return cfg
    return cfg.replace(layer_widths=None, padded_widths=[dict(w) for w in cfg.layer_widths])


def compact_config(cfg: ModelConfig) -> ModelConfig:
    """The compact config a padded slice was made from (its parameter count is the budget's)."""
    if cfg.padded_widths is None:
        return cfg
    return cfg.replace(layer_widths=[dict(w) for w in cfg.padded_widths], padded_widths=None)


def _grow(t: torch.Tensor, axis: int, old: tuple[int, ...], new: tuple[int, ...]) -> torch.Tensor:
    """Axis ``axis`` of t, viewed as the grid ``old`` (e.g. (G, h/G, p)), grown with zeros to ``new``."""
    v = t.unflatten(axis, old)
    out = v.new_zeros(v.shape[:axis] + tuple(new) + v.shape[axis + len(old):])
    out[(slice(None),) * axis + tuple(slice(0, o) for o in old)] = v
    return out.flatten(axis, axis + len(old) - 1)


def norm_scale(cfg: ModelConfig, compact: dict[str, int]) -> float:
    """sqrt(n / n_pad): the factor on a padded Mamba layer's gated-norm weight (n channels per group)."""
    return math.sqrt(compact["mamba_num_heads"] * compact["mamba_head_dim"]
                     / (cfg.mamba_num_heads * cfg.mamba_head_dim))


def eps_factors(cfg: ModelConfig) -> dict[int, float]:
    """Layer index -> k = n_pad / n, the factor on the gated-norm epsilon of each padded Mamba layer
    whose group was padded (k > 1), for a padded (or compact) slice config; empty when exact."""
    widths = cfg.padded_widths if cfg.padded_widths is not None else cfg.layer_widths
    if widths is None:
        return {}
    n_pad = cfg.mamba_num_heads * cfg.mamba_head_dim  # the padded width (per group: both over G)
    return {i: n_pad / n for i, (t, w) in enumerate(zip(cfg.layers_block_type, widths))
            if t == "linear_attention" and (n := w["mamba_num_heads"] * w["mamba_head_dim"]) < n_pad}


def norm_relative_error_bound(n: int, n_pad: int, eps: float, mean_square: float) -> float:
    """Bound on |padded / compact - 1| for a gated-norm group of mean square ``mean_square`` (see the
    module docstring): (k - 1) eps / (m + k eps), k = n_pad / n."""
    k = n_pad / n
    return (k - 1) * eps / (mean_square + k * eps)


@torch.no_grad()
def pad_state(compact_cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The padded state dict of a compact slice (group-contiguous heads, HF key names): every layer at
    ``padded_config(compact_cfg)``'s widths, computing the same function (see the module docstring)."""
    return {n: pad_tensor(compact_cfg, n, t).contiguous() for n, t in state.items()}


@torch.no_grad()
def pad_tensor(compact_cfg: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    """Tensor ``name`` of a compact slice, padded (:func:`pad_state`, one tensor at a time)."""
    if compact_cfg.layer_widths is None or not name.startswith("backbone.layers."):
        return t
    i, _, key = name[len("backbone.layers."):].partition(".")
    if not key.startswith("mixer."):
        return t  # the block's norm: width d, not padded
    i, key = int(i), key[len("mixer."):]
    cfg = padded_config(compact_cfg)
    G, nkv, hd = cfg.n_groups, cfg.num_key_value_heads, cfg.head_dim
    w = compact_cfg.layer_dims(i)
    kind = cfg.layers_block_type[i]
    if kind == "linear_attention":
        h, p, H, P = w["mamba_num_heads"], w["mamba_head_dim"], cfg.mamba_num_heads, cfg.mamba_head_dim
        hp, GN2 = h * p, 2 * cfg.n_groups * cfg.ssm_state_size
        chan, chan_pad = (G, h // G, p), (G, H // G, P)  # group-contiguous heads, channels inside
        head, head_pad = (G, h // G), (G, H // G)
        if key in ("in_proj.weight", "in_proj.bias"):  # rows (dim 0)  # [z (hp) | x (hp) | B | C (GN2) | dt (h)]
            z, xs, bc, dt = t.split([hp, hp, GN2, h])
            return torch.cat([_grow(z, 0, chan, chan_pad), _grow(xs, 0, chan, chan_pad), bc,
                              _grow(dt, 0, head, head_pad)])
        if key in ("conv1d.weight", "conv1d.bias"):  # channels (dim 0)  # [x (hp) | B | C]
            xs, bc = t.split([hp, GN2])
            return torch.cat([_grow(xs, 0, chan, chan_pad), bc])
        if key in ("dt_bias", "A_log", "D"):
            return _grow(t, 0, head, head_pad)
        if key == "norm.weight":
            return _grow(t * norm_scale(cfg, w), 0, chan, chan_pad)
        if key == "out_proj.weight":
            return _grow(t, 1, chan, chan_pad)
        return t  # out_proj.bias: width d
    if kind == "full_attention":
        h, H = w["num_attention_heads"], cfg.num_attention_heads
        q, q_pad = (nkv, h // nkv, hd), (nkv, H // nkv, hd)  # query heads inside their KV group
        return _grow(t, 0, q, q_pad) if key == "q_proj.weight" else _grow(t, 1, q, q_pad) \
            if key == "o_proj.weight" else t
    if kind == "moe":  # expert and shared neurons pad as MLP neurons do; expert counts cannot pad
        if w["n_routed_experts"] != cfg.n_routed_experts:
            raise BudgetError(f"layer {i} keeps {w['n_routed_experts']} routed experts and another MoE layer "
                              f"{cfg.n_routed_experts}: a plain nemotron_h config has one expert count, and a "
                              "zero expert would still be routed to", field="layout",
                              fix="slice with --layout compact, or keep one expert count in every MoE layer")
        f, F = (w["moe_intermediate_size"],), (cfg.moe_intermediate_size,)
        if key == "experts.up_proj":
            return _grow(t, 1, f, F)  # [E, F, din]
        if key == "experts.down_proj":
            return _grow(t, 2, f, F)  # [E, din, F]
        if key.startswith("shared_experts."):
            s, S = (w["moe_shared_expert_intermediate_size"],), (cfg.moe_shared_expert_intermediate_size,)
            return _pad_mlp(key[len("shared_experts."):], t, s, S)
        return t
    return _pad_mlp(key, t, (w["intermediate_size"],), (cfg.intermediate_size,))


def _pad_mlp(key: str, t: torch.Tensor, f: tuple[int], F: tuple[int]) -> torch.Tensor:
    """An MLP's f neurons grown to F: zero up_proj rows (and bias), zero down_proj columns."""
    if key in ("up_proj.weight", "up_proj.bias"):
        return _grow(t, 0, f, F)
    if key == "down_proj.weight":
        return _grow(t, 1, f, F)
    return t
