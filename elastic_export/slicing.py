"""Zero-shot slicing: any budget of an elastic model -> a standalone checkpoint with the same logits.

The rows and columns come from the views of :mod:`elastic_export.elastic` (the one rule), copied
into contiguous tensors. Skipped layers are removed. Heads move from the nested rank-major order
back to the group-contiguous order that Hugging Face expects (MoE experts likewise over their routing
groups); a MoE budget's config carries its kept expert count and widths and its capped top-k. A homogeneous budget (the same widths
in every layer of a type) becomes a plain `nemotron_h` config that transformers loads; a
heterogeneous one carries per-layer widths in config.json (``elastic.layer_widths``) and loads with
:func:`elastic_export.load`.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import elastic
from .config import ModelConfig
from .elastic import Subnet, head_order_index, moe_top_k, validate_subnet
from .errors import BudgetError

TYPE_WIDTHS = {"linear_attention": ("mamba_num_heads", "mamba_head_dim"),
               "full_attention": ("num_attention_heads",), "mlp": ("intermediate_size",),
               "moe": ("n_routed_experts", "moe_intermediate_size", "moe_shared_expert_intermediate_size")}


def _widths(t: str, w) -> dict[str, int]:
    if t == "linear_attention":
        return {"mamba_num_heads": w.mamba_heads, "mamba_head_dim": w.mamba_head_dim}
    if t == "full_attention":
        return {"num_attention_heads": w.attn_heads}
    if t == "moe":
        return {"n_routed_experts": w.experts, "moe_intermediate_size": w.expert_ffn,
                "moe_shared_expert_intermediate_size": w.shared_ffn}
    return {"intermediate_size": w.ffn}


def sliced_config(cfg: ModelConfig, subnet: Subnet) -> ModelConfig:
    """The standalone config of a budget: kept layers only, its widths, group-contiguous heads."""
    validate_subnet(cfg, subnet)
    kept = [(i, t, w) for i, (t, w) in enumerate(zip(cfg.layers_block_type, subnet.layers)) if w.kept]
    per_layer = [_widths(t, w) for _, t, w in kept]
    globals_: dict[str, int] = {}
    homogeneous = True
    for key in sum(TYPE_WIDTHS.values(), ()):
        values = {d[key] for d in per_layer if key in d}
        if len(values) > 1:
            homogeneous = False
        globals_[key] = max(values) if values else getattr(cfg, key)
    if any(t == "moe" for _, t, _ in kept):  # top-k as the kept experts cap it (every layer: elastic.moe_top_k)
        globals_["num_experts_per_tok"] = moe_top_k(cfg, globals_["n_routed_experts"])
    return cfg.replace(hidden_size=subnet.hidden, layers_block_type=[t for _, t, _ in kept],
                       head_order="group_contiguous", layer_widths=None if homogeneous else per_layer,
                       padded_widths=None, **globals_)


def _to_contiguous(t: torch.Tensor, groups: int, order: str) -> torch.Tensor:
    """Reorder the head axis (dim 0) of t from ``order`` to group-contiguous; copy."""
    if order == "group_contiguous" or groups == 1:
        return t
    return t[head_order_index(t.shape[0], groups, order, "group_contiguous")]


def slice_thunks(model, subnet: Subnet) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> a function making that tensor of the standalone budget (HF key names). Each reads only
    the views it needs, so a caller can make, write and drop one tensor at a time
    (:func:`slice_entries`); :func:`slice_state` makes them all."""
    cfg = model.config
    validate_subnet(cfg, subnet)
    d = subnet.hidden
    emb, norm_f = model.backbone.embeddings.weight, model.backbone.norm_f
    out = {"backbone.embeddings.weight": lambda: elastic.embedding_view(emb, d),
           "backbone.norm_f.weight": lambda: elastic.norm_view(norm_f, d)}
    if model.lm_head is not None:
        head = model.lm_head.weight
        out["lm_head.weight"] = lambda: elastic.embedding_view(head, d)
    j = 0
    for blk, w in zip(model.backbone.layers, subnet.layers):
        if w.kept:
            _layer_thunks(out, f"backbone.layers.{j}.", blk, w, d, cfg.head_order)
            j += 1
    return out


def _layer_thunks(out: dict, pre: str, blk, w, d: int, order: str) -> None:
    m = pre + "mixer."
    out[pre + "norm.weight"] = lambda: elastic.norm_view(blk.norm, d)
    if blk.block_type == "linear_attention":
        v = elastic.mamba_views(blk.mixer, w, d)
        G = blk.mixer.n_groups

        def heads(t):  # head axis first -> group-contiguous
            return _to_contiguous(t, G, order)

        # in_proj rows  # [z (h*p) | x (h*p) | B | C | dt (h)]
        out[m + "in_proj.weight"] = lambda: torch.cat([heads(v.Wz).flatten(0, 1), heads(v.Wx).flatten(0, 1),
                                                       v.WB, v.WC, heads(v.Wdt)])
        if v.bias is not None:
            bz, bx, bB, bC, bdt = v.bias
            out[m + "in_proj.bias"] = lambda: torch.cat([heads(bz).flatten(), heads(bx).flatten(), bB, bC, heads(bdt)])
        out[m + "conv1d.weight"] = lambda: torch.cat([heads(v.conv_x).flatten(0, 1), v.conv_bc])[:, None, :]
        if v.conv_bias_x is not None:
            out[m + "conv1d.bias"] = lambda: torch.cat([heads(v.conv_bias_x).flatten(), v.conv_bias_bc])
        out[m + "dt_bias"], out[m + "A_log"], out[m + "D"] = (lambda: heads(v.dt_bias)), (lambda: heads(v.A_log)), \
            (lambda: heads(v.D))
        out[m + "norm.weight"] = lambda: heads(v.norm).flatten()
        out[m + "out_proj.weight"] = lambda: heads(v.Wout.transpose(0, 1)).transpose(0, 1).flatten(1, 2)
        if v.bout is not None:
            out[m + "out_proj.bias"] = lambda: v.bout
    elif blk.block_type == "full_attention":
        v = elastic.attention_views(blk.mixer, w, d)
        hd, nkv = blk.mixer.head_dim, blk.mixer.num_kv_heads
        out[m + "q_proj.weight"] = lambda: _to_contiguous(v.Wq.unflatten(0, (-1, hd)), nkv, order).flatten(0, 1)
        out[m + "k_proj.weight"], out[m + "v_proj.weight"] = (lambda: v.Wk), (lambda: v.Wv)
        out[m + "o_proj.weight"] = lambda: _to_contiguous(v.Wo.unflatten(1, (-1, hd)).transpose(0, 1), nkv,
                                                          order).transpose(0, 1).flatten(1)
    elif blk.block_type == "moe":
        v = elastic.moe_views(blk.mixer, w, d)

        def experts(t):  # expert axis first -> group-contiguous over the routing groups
            return lambda: _to_contiguous(t, blk.mixer.n_group, order)

        out[m + "gate.weight"], out[m + "gate.e_score_correction_bias"] = experts(v.Wr), experts(v.score_bias)
        out[m + "experts.up_proj"], out[m + "experts.down_proj"] = experts(v.Wup), experts(v.Wdown)
        _mlp_thunks(out, m + "shared_experts.", v.shared)
        if v.latent is not None:
            W1, b1, W2, b2 = v.latent
            out[m + "fc1_latent_proj.weight"], out[m + "fc2_latent_proj.weight"] = (lambda: W1), (lambda: W2)
            if b1 is not None:
                out[m + "fc1_latent_proj.bias"], out[m + "fc2_latent_proj.bias"] = (lambda: b1), (lambda: b2)
    else:
        _mlp_thunks(out, m, elastic.mlp_views(blk.mixer, w, d))


def _mlp_thunks(out: dict, prefix: str, v: elastic.MLPViews) -> None:
    out[prefix + "up_proj.weight"], out[prefix + "down_proj.weight"] = (lambda: v.Wup), (lambda: v.Wdown)
    if v.biases is not None:
        out[prefix + "up_proj.bias"], out[prefix + "down_proj.bias"] = (lambda: v.biases[0]), (lambda: v.biases[1])


@torch.no_grad()
def slice_state(model, subnet: Subnet) -> dict[str, torch.Tensor]:
    """The state dict of the standalone budget (HF key names, contiguous copies)."""
    return {k: f().detach().clone().contiguous() for k, f in slice_thunks(model, subnet).items()}


def slice_entries(model, subnet: Subnet, layout: str = "compact") -> dict:
    """The standalone budget's state as lazy entries (hf_io.Lazy): dtype and shape known, each tensor
    made from ``model``'s (possibly memory-mapped) weights only when it is written
    (:func:`elastic_export.hf_io.save_entries`). ``layout``: see :func:`slice_budget`."""
    from .hf_io import Lazy, lazy_entries, zeros_view
    from .padding import PADDED, pad_tensor

    def build(m):
        return {n: _made(f) for n, f in slice_thunks(m, subnet).items()}

    entries = lazy_entries(build, model)
    if layout == PADDED:
        cfg = sliced_config(model.config, subnet)
        specs = {}
        for n, e in entries.items():  # padded shapes from zero probes (hf_io.probe_twin), one at a time
            t = pad_tensor(cfg, n, zeros_view(e.dtype, e.shape))
            specs[n] = (t.dtype, tuple(t.shape))
            del t
        entries = {n: Lazy(*specs[n], lambda n=n, e=e: pad_tensor(cfg, n, e.make())) for n, e in entries.items()}
    return entries


def _made(f):
    def make():
        with torch.no_grad():
            return f().detach().contiguous()
    return make


def save_slice(model, subnet: Subnet, path, layout: str = "compact", dtype: torch.dtype | None = None,
               after=None):
    """Write the standalone checkpoint of one budget, one tensor at a time (never the whole sliced
    model in memory): the files ``slice_budget(model, subnet, layout).save_pretrained(path, dtype)``
    writes. Returns its config."""
    from .hf_io import save_entries
    from .padding import LAYOUTS, PADDED, padded_config

    if layout not in LAYOUTS:
        raise BudgetError(f"unknown slice layout {layout!r}", field="layout", fix=f"use one of {', '.join(LAYOUTS)}")
    cfg = sliced_config(model.config, subnet)
    if layout == PADDED:
        cfg = padded_config(cfg)
    save_entries(cfg, slice_entries(model, subnet, layout), path, dtype=dtype, after=after)
    return cfg


def slice_budget(model, subnet: Subnet, layout: str = "compact"):
    """A standalone :class:`NemotronHForCausalLM` for one budget (its own weights; same logits as
    ``model(x, subnet=subnet)``). Save it with ``.save_pretrained(path)``.

    ``layout`` matters for a heterogeneous budget only: ``compact`` keeps per-layer widths (smallest;
    our loader), ``padded`` writes a plain `nemotron_h` model every reader loads (its gated-norm
    epsilon effect is bounded in :mod:`elastic_export.padding`)."""
    from .model import NemotronHForCausalLM
    from .padding import LAYOUTS, PADDED, pad_state, padded_config

    if layout not in LAYOUTS:
        raise BudgetError(f"unknown slice layout {layout!r}", field="layout", fix=f"use one of {', '.join(LAYOUTS)}")
    cfg = sliced_config(model.config, subnet)
    state = slice_state(model, subnet)
    if layout == PADDED:
        cfg, state = padded_config(cfg), pad_state(cfg, state)
    with torch.device("meta"):
        out = NemotronHForCausalLM(cfg)
    out.load_state_dict(state, assign=True)
    return out.train(model.training)
