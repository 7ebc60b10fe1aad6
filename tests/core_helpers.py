"""Helpers for the elastic-core tests: sorted tiny models and random valid subnets."""

from __future__ import annotations

import random

import torch

from elastic_export.elastic import LayerWidths, Subnet
from elastic_export.importance import compute_importance
from elastic_export.sorting import sort_model
from helpers import random_model


def calib_ids(cfg, n: int = 4, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (n, length), generator=torch.Generator().manual_seed(seed))


def sorted_model(seed: int = 0, depth: str = "none", **overrides):
    """(unsorted parent, sorted parent, sorted importance) for a random tiny config."""
    m = random_model(seed, **overrides).eval()
    imp = compute_importance(m, calib_ids(m.config, seed=seed), batch_size=4, depth=depth)
    s, simp = sort_model(m, imp)
    return m, s.eval(), simp


def random_subnet(cfg, rng: random.Random, homogeneous: bool, skip: float = 0.25) -> Subnet:
    """A random subnet that satisfies every constraint (group counts, KV groups, a kept layer)."""
    H, P, G = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups
    A, kv, F = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size

    def pick():
        return dict(mh=G * rng.randint(1, H // G), md=rng.randint(1, P), ah=kv * rng.randint(1, A // kv),
                    f=rng.randint(1, F))

    shared = pick()
    layers = []
    for t in cfg.layers_block_type:
        c = shared if homogeneous else pick()
        kept = rng.random() >= skip
        if t == "linear_attention":
            layers.append(LayerWidths(kept, mamba_heads=c["mh"], mamba_head_dim=c["md"]))
        elif t == "full_attention":
            layers.append(LayerWidths(kept, attn_heads=c["ah"]))
        else:
            layers.append(LayerWidths(kept, ffn=c["f"]))
    if not any(w.kept for w in layers):
        w = layers[0]
        layers[0] = LayerWidths(True, w.mamba_heads, w.mamba_head_dim, w.attn_heads, w.ffn)
    return Subnet(rng.randint(1, cfg.hidden_size), tuple(layers))
