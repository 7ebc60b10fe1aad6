"""Random budgets and on-disk nested checkpoints for the build / engine tests."""

from __future__ import annotations

import random

from elastic_export.elastic import LayerWidths, Subnet, full_subnet


def random_subnet(cfg, seed: int, keep_all: bool = False) -> Subnet:
    """A random budget: every axis shrunk (embedding width, heads, head channels, FFN, depth; MoE: experts
    kept per routing group, expert and shared-expert widths)."""
    rng = random.Random(seed)
    G, kv = cfg.n_groups, cfg.num_key_value_heads
    layers = []
    for i, t in enumerate(cfg.layers_block_type):
        d = cfg.layer_dims(i)
        kept = keep_all or rng.random() < 0.8
        if t == "linear_attention":
            w = LayerWidths(kept=kept, mamba_heads=G * rng.randint(1, d["mamba_num_heads"] // G),
                            mamba_head_dim=rng.randint(1, d["mamba_head_dim"]))
        elif t == "full_attention":
            w = LayerWidths(kept=kept, attn_heads=kv * rng.randint(1, d["num_attention_heads"] // kv))
        elif t == "moe":
            ng = cfg.n_group  # routing groups (G is the Mamba groups)
            w = LayerWidths(kept=kept, experts=ng * rng.randint(2, d["n_routed_experts"] // ng),
                            expert_ffn=rng.randint(1, d["moe_intermediate_size"]),
                            shared_ffn=rng.randint(1, d["moe_shared_expert_intermediate_size"]))
        else:
            w = LayerWidths(kept=kept, ffn=rng.randint(1, d["intermediate_size"]))
        layers.append(w)
    if not any(w.kept for w in layers):
        layers[0] = LayerWidths(**{**layers[0].__dict__, "kept": True})
    return Subnet(rng.randint(cfg.hidden_size // 2, cfg.hidden_size), tuple(layers))


def family(cfg, seed: int = 0, n: int = 2) -> dict[str, Subnet]:
    """The full model first, then ``n - 1`` random budgets."""
    out = {"full": full_subnet(cfg)}
    for k in range(1, n):
        out[f"b{k}"] = random_subnet(cfg, seed * 100 + k)
    return out


def save_nested_fixture(path, model, budgets: dict[str, Subnet]):
    """A nested checkpoint on disk (budgets in the manifest's order: largest first)."""
    from elastic_export.nested import save_nested

    return save_nested(path, model, budgets)
