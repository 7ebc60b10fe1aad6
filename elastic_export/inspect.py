"""`elastic-export inspect`: a layer table and parameter counts, from a config alone (meta device)."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ModelConfig, preset as make_preset
from .errors import ConfigError

TYPE_NAMES = {"linear_attention": "mamba2", "full_attention": "attention", "mlp": "mlp"}


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


def inspect_text(cfg: ModelConfig, weights: str | None = None) -> str:
    emb, per_layer, head = layer_parameter_counts(cfg)
    total = emb + sum(per_layer) + head
    lines = [f"NemotronH hybrid: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, "
             f"pattern {cfg.hybrid_override_pattern}", ""]
    lines.append(f"{'layer':>5}  {'type':<9}  {'widths':<34}  {'params':>10}")
    for i, (t, n) in enumerate(zip(cfg.layers_block_type, per_layer)):
        d = cfg.layer_dims(i)
        if t == "linear_attention":
            w = f"{d['mamba_num_heads']} heads x {d['mamba_head_dim']}, {cfg.n_groups} groups, N={cfg.ssm_state_size}"
        elif t == "full_attention":
            w = f"{d['num_attention_heads']} heads / {cfg.num_key_value_heads} kv x {cfg.head_dim}"
        else:
            w = f"ffn {d['intermediate_size']}"
        lines.append(f"{i:>5}  {TYPE_NAMES[t]:<9}  {w:<34}  {human(n):>10}")
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
    lines.append("")
    lines.append(f"weights: {gb(total * 2)} at BF16, {gb(total * 4)} at FP32")
    if weights:
        lines.append(weights)
    return "\n".join(lines)
