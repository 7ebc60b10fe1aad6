"""Helpers of the validation tests: a small rank-major family (byte-level vocabulary) and its budgets."""

from __future__ import annotations

import pytest
import torch

from elastic_export.elastic import LayerWidths, Subnet, full_subnet
from helpers import random_model


def fraction_subnet(cfg, f: float) -> Subnet:
    """About a fraction f of every axis, respecting the group constraints."""
    layers = []
    for t, w in zip(cfg.layers_block_type, full_subnet(cfg).layers):
        if t == "linear_attention":
            G = cfg.n_groups
            layers.append(LayerWidths(mamba_heads=G * max(1, int(w.mamba_heads // G * f)),
                                      mamba_head_dim=max(1, int(w.mamba_head_dim * f))))
        elif t == "full_attention":
            G = cfg.num_key_value_heads
            layers.append(LayerWidths(attn_heads=G * max(1, int(w.attn_heads // G * f))))
        else:
            layers.append(LayerWidths(ffn=max(1, int(w.ffn * f))))
    return Subnet(max(1, int(cfg.hidden_size * f)), tuple(layers))


def small_family(seed: int = 0):
    """(model, budgets): groups and KV heads > 1 so head order matters; vocabulary fits the byte tokenizer."""
    model = random_model(seed, vocab_size=259, head_order="rank_major", n_groups=2, mamba_num_heads=6,
                         num_key_value_heads=2, num_attention_heads=6).eval()
    cfg = model.config
    budgets = {"full": full_subnet(cfg), "b75": fraction_subnet(cfg, 0.75), "b50": fraction_subnet(cfg, 0.5)}
    return model, budgets


EVAL = dict(n_tasks=3, n_rows=2, seq_len=48, n_prompts=2, greedy_tokens=8, decode_steps=6)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on two busy cores shared with others."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
