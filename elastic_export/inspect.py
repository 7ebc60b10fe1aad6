"""`elastic-export inspect`: a layer table and parameter counts, from a config alone (meta device)."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ModelConfig, preset as make_preset
from .errors import ConfigError

TYPE_NAMES = {"linear_attention": "mamba2", "full_attention": "attention", "mlp": "mlp", "moe": "moe"}


def resolve_config(path: str | None, preset: str | None) -> ModelConfig:
    if preset:
        return make_preset(preset)
    if path is None:
        raise ConfigError("give a checkpoint directory, a config.json, or --preset NAME", field="PATH")
    p = Path(path)
    if p.is_dir():
        if (p / "config.json").is_file():
            from .hf_io import load_config

            return load_config(p)  # tying resolved against the weights, as a load would
        raise ConfigError("is not a checkpoint: config.json is missing", path=p,
                          fix="give a directory with config.json, or the config.json itself")
    return ModelConfig.from_file(p)


def layer_parameter_counts(cfg: ModelConfig) -> tuple[int, list[int], int]:
    """(embedding params, params per layer incl. its norm, final norm + lm_head) via the meta device."""
    from .model import NemotronHForCausalLM

    with torch.device("meta"):
        model = NemotronHForCausalLM(cfg)
    emb = model.backbone.embeddings.weight.numel()
    per_layer = [sum(p.numel() for p in blk.parameters()) for blk in model.backbone.layers]
    head = model.backbone.norm_f.weight.numel() + (0 if model.lm_head is None else model.lm_head.weight.numel())
    return emb, per_layer, head


def human(n: float, unit: str = "") -> str:
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"


def weights_summary(path: str | None, cfg: ModelConfig) -> str | None:
    """Check the weights next to a config (headers only) and describe them; None when there are none."""
    from .hf_io import check_tensors, tensor_headers

    if path is None:
        return None
    p = Path(path)
    directory = p if p.is_dir() else p.parent
    if not any(directory.glob("*.safetensors")):
        return None
    headers = tensor_headers(directory)
    check_tensors(directory, cfg, {k: v[0] for k, v in headers.items()})
    dtypes = sorted({v[1] for v in headers.values()})
    nbytes = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    return f"weights on disk: {len(headers)} tensors, {'/'.join(dtypes)}, {gb(nbytes)} (shapes match the config)"


def nested_summary(path: str) -> str:
    """The parent's layer table plus every budget of a nested checkpoint (manifest only, no weights)."""
    from .accounting import count_params
    from .nested import read_manifest
    from .search import describe

    manifest, cfg, budgets = read_manifest(path)
    lines = [inspect_text(cfg), "", f"nested checkpoint {path} (format {manifest.get('format_version')}): "
             f"{len(budgets)} budgets over one weight copy"]
    full = count_params(cfg)
    fractions = {b["name"]: b.get("fraction") for b in manifest["budgets"]}
    tr = manifest.get("training") or {}
    tol = tr.get("tolerance") if tr.get("budget_metric", "params") == "params" else None
    for name, subnet in budgets.items():
        n = count_params(cfg, subnet)
        f = fractions.get(name)
        target = ""
        if f is not None and f < 1.0:  # the training target, and whether the budget landed in its band
            target = f"  target {f:.0%}" + ("" if tol is None else
                                            f" +- {tol:.0%}: {'in band' if abs(n / full / f - 1) <= tol else 'OUT OF BAND'}")
        lines.append(f"  {name:<10} {n:>14,} params ({100 * n / full:5.1f}%)  {describe(cfg, subnet)}{target}")
    return "\n".join(lines)


def layout_text(cfg: ModelConfig) -> str | None:
    """Which slice layout a config is (padded / compact) and what the padding costs; None for a plain model."""
    from .padding import compact_config, eps_factors, layout_of, padded_config

    kind = layout_of(cfg)
    if kind == "plain":
        return None
    padded, compact = (cfg, compact_config(cfg)) if kind == "padded" else (padded_config(cfg), cfg)
    n_pad, n = (sum(layer_parameter_counts(c)[1]) for c in (padded, compact))  # only layers are padded
    emb, _, head = layer_parameter_counts(compact)
    extra = n_pad - n
    cost = (f"{extra:,} zero parameters ({100 * extra / (emb + n + head):.1f}% more), "
            f"{gb(2 * extra)} at BF16, {gb(4 * extra)} at FP32")
    k = eps_factors(cfg)
    eps = (f"; padded Mamba layers {', '.join(f'{i} (x{f:.3g})' for i, f in k.items())} run with their gated-norm "
           f"epsilon multiplied (elastic_export/padding.py)") if k else "; the same function as the compact layout"
    if kind == "padded":
        return f"layout: padded (a plain nemotron_h checkpoint every reader loads): {cost}{eps}"
    return (f"layout: compact (per-layer widths in config.json, elastic_export.load only); the padded layout "
            f"(elastic-export slice --layout padded, every reader) would add {cost}")


def moe_widths(cfg: ModelConfig, d: dict) -> str:
    """A MoE layer's widths in words: experts, top-k, routing groups, expert and shared widths, latent."""
    from .elastic import moe_top_k

    E = d["n_routed_experts"]
    groups = f" in {cfg.n_group} groups (top {cfg.topk_group})" if cfg.n_group > 1 else ""
    latent = f", latent {cfg.moe_latent_size}" if cfg.moe_latent_size is not None else ""
    return (f"{E} experts{groups}, top {moe_top_k(cfg, E)}, ffn {d['moe_intermediate_size']}, "
            f"shared {d['moe_shared_expert_intermediate_size']}{latent}")


def inspect_text(cfg: ModelConfig, weights: str | None = None) -> str:
    from .accounting import active_layer_params, embedding_params
    from .elastic import full_subnet
    from .padding import compact_config

    emb, per_layer, head = layer_parameter_counts(cfg)
    real = compact_config(cfg)
    total = emb + sum(per_layer) + head
    full = full_subnet(cfg)
    active = [active_layer_params(cfg, i, cfg.hidden_size, w) for i, w in enumerate(full.layers)]
    total_active = embedding_params(cfg, cfg.hidden_size) + sum(active)
    lines = [f"NemotronH hybrid: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, "
             f"pattern {cfg.hybrid_override_pattern}", ""]
    lines.append(f"{'layer':>5}  {'type':<9}  {'widths':<54}  {'params':>10}  {'active':>10}")
    for i, (t, n) in enumerate(zip(cfg.layers_block_type, per_layer)):
        d, r = cfg.layer_dims(i), real.layer_dims(i)
        if t == "linear_attention":
            w = f"{d['mamba_num_heads']} heads x {d['mamba_head_dim']}, {cfg.n_groups} groups, N={cfg.ssm_state_size}"
            pad = (r["mamba_num_heads"], r["mamba_head_dim"]) != (d["mamba_num_heads"], d["mamba_head_dim"])
            real_w = f"{r['mamba_num_heads']}x{r['mamba_head_dim']}"
        elif t == "full_attention":
            w = f"{d['num_attention_heads']} heads / {cfg.num_key_value_heads} kv x {cfg.head_dim}"
            pad, real_w = r["num_attention_heads"] != d["num_attention_heads"], f"{r['num_attention_heads']} heads"
        elif t == "moe":
            w = moe_widths(cfg, d)
            keys = ("moe_intermediate_size", "moe_shared_expert_intermediate_size")
            pad = any(r[k] != d[k] for k in keys)
            real_w = f"ffn {r[keys[0]]}, shared {r[keys[1]]}"
        else:
            w = f"ffn {d['intermediate_size']}"
            pad, real_w = r["intermediate_size"] != d["intermediate_size"], f"{r['intermediate_size']}"
        if pad:
            w += f" (real {real_w})"
        lines.append(f"{i:>5}  {TYPE_NAMES[t]:<9}  {w:<54}  {human(n):>10}  {human(active[i]):>10}")
    lines.append("")
    by_type: dict[str, tuple[int, int]] = {}
    for t, n in zip(cfg.layers_block_type, per_layer):
        c, s = by_type.get(t, (0, 0))
        by_type[t] = (c + 1, s + n)
    lines.append(f"{'component':<22} {'count':>5} {'params':>16}")
    lines.append(f"{'embeddings':<22} {1:>5} {emb:>16,}")
    for t, (c, s) in by_type.items():
        lines.append(f"{TYPE_NAMES[t] + ' layers':<22} {c:>5} {s:>16,}")
    lines.append(f"{'final norm + lm_head':<22} {1:>5} {head:>16,}" + ("  (tied)" if cfg.tie_word_embeddings else ""))
    lines.append(f"{'total':<22} {'':>5} {total:>16,}  ({human(total)})")
    if cfg.has_moe:
        lines.append(f"{'active per token':<22} {'':>5} {total_active:>16,}  ({human(total_active)}: MoE layers "
                     f"count their top-k routed experts)")
    lines.append("")
    lines.append(f"weights: {gb(total * 2)} at BF16, {gb(total * 4)} at FP32" +
                 (" (every expert resident; routers float32)" if cfg.has_moe else ""))
    if (layout := layout_text(cfg)) is not None:
        lines.append(layout)
    if weights:
        lines.append(weights)
    return "\n".join(lines)
