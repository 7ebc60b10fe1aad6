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


@torch.no_grad()
def slice_state(model, subnet: Subnet) -> dict[str, torch.Tensor]:
    """The state dict of the standalone budget (HF key names, contiguous copies)."""
    cfg = model.config
    validate_subnet(cfg, subnet)
    order = cfg.head_order
    d = subnet.hidden
    out = {"backbone.embeddings.weight": elastic.embedding_view(model.backbone.embeddings.weight, d),
           "backbone.norm_f.weight": elastic.norm_view(model.backbone.norm_f, d)}
    if model.lm_head is not None:
        out["lm_head.weight"] = elastic.embedding_view(model.lm_head.weight, d)
    j = 0
    for blk, w in zip(model.backbone.layers, subnet.layers):
        if not w.kept:
            continue
        pre, m = f"backbone.layers.{j}.", f"backbone.layers.{j}.mixer."
        j += 1
        out[pre + "norm.weight"] = elastic.norm_view(blk.norm, d)
        if blk.block_type == "linear_attention":
            v = elastic.mamba_views(blk.mixer, w, d)
            G = blk.mixer.n_groups

            def heads(t):  # head axis first -> group-contiguous
                return _to_contiguous(t, G, order)

            # in_proj rows  # [z (h*p) | x (h*p) | B | C | dt (h)]
            out[m + "in_proj.weight"] = torch.cat([heads(v.Wz).flatten(0, 1), heads(v.Wx).flatten(0, 1),
                                                   v.WB, v.WC, heads(v.Wdt)])
            if v.bias is not None:
                bz, bx, bB, bC, bdt = v.bias
                out[m + "in_proj.bias"] = torch.cat([heads(bz).flatten(), heads(bx).flatten(), bB, bC, heads(bdt)])
            out[m + "conv1d.weight"] = torch.cat([heads(v.conv_x).flatten(0, 1), v.conv_bc])[:, None, :]
            if v.conv_bias_x is not None:
                out[m + "conv1d.bias"] = torch.cat([heads(v.conv_bias_x).flatten(), v.conv_bias_bc])
            out[m + "dt_bias"], out[m + "A_log"], out[m + "D"] = heads(v.dt_bias), heads(v.A_log), heads(v.D)
            out[m + "norm.weight"] = heads(v.norm).flatten()
            out[m + "out_proj.weight"] = heads(v.Wout.transpose(0, 1)).transpose(0, 1).flatten(1, 2)
            if v.bout is not None:
                out[m + "out_proj.bias"] = v.bout
        elif blk.block_type == "full_attention":
            v = elastic.attention_views(blk.mixer, w, d)
            hd, nkv = blk.mixer.head_dim, blk.mixer.num_kv_heads
            q = _to_contiguous(v.Wq.unflatten(0, (-1, hd)), nkv, order).flatten(0, 1)
            o = _to_contiguous(v.Wo.unflatten(1, (-1, hd)).transpose(0, 1), nkv, order).transpose(0, 1).flatten(1)
            out.update({m + "q_proj.weight": q, m + "k_proj.weight": v.Wk, m + "v_proj.weight": v.Wv,
                        m + "o_proj.weight": o})
        elif blk.block_type == "moe":
            v = elastic.moe_views(blk.mixer, w, d)

            def experts(t):  # expert axis first -> group-contiguous over the routing groups
                return _to_contiguous(t, blk.mixer.n_group, order)

            out[m + "gate.weight"], out[m + "gate.e_score_correction_bias"] = experts(v.Wr), experts(v.score_bias)
            out[m + "experts.up_proj"], out[m + "experts.down_proj"] = experts(v.Wup), experts(v.Wdown)
            _mlp_state(out, m + "shared_experts.", v.shared)
            if v.latent is not None:
                W1, b1, W2, b2 = v.latent
                out[m + "fc1_latent_proj.weight"], out[m + "fc2_latent_proj.weight"] = W1, W2
                if b1 is not None:
                    out[m + "fc1_latent_proj.bias"], out[m + "fc2_latent_proj.bias"] = b1, b2
        else:
            _mlp_state(out, m, elastic.mlp_views(blk.mixer, w, d))
    return {k: t.detach().clone().contiguous() for k, t in out.items()}


def _mlp_state(out: dict, prefix: str, v: elastic.MLPViews) -> None:
    out[prefix + "up_proj.weight"], out[prefix + "down_proj.weight"] = v.Wup, v.Wdown
    if v.biases is not None:
        out[prefix + "up_proj.bias"], out[prefix + "down_proj.bias"] = v.biases


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
