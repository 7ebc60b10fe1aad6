"""Shared test helpers: tiny random configs, randomized weights, the transformers reference."""

from __future__ import annotations

import random

import torch

import elastic_export as ee
from elastic_export.model import build_model


def tiny_config(seed: int = 0, **overrides) -> ee.ModelConfig:
    """A random tiny hybrid with all three layer types, odd sizes and heads not powers of two."""
    rng = random.Random(seed)
    groups = rng.choice([1, 2, 4])
    kv = rng.choice([1, 2, 3])
    layers = ["linear_attention", "mlp", "full_attention", "linear_attention", "mlp"]
    rng.shuffle(layers)
    cfg = dict(
        vocab_size=rng.choice([97, 131, 203]), hidden_size=rng.choice([40, 48, 56]), layers_block_type=layers,
        mamba_num_heads=groups * rng.choice([3, 5]), mamba_head_dim=rng.choice([6, 10]), n_groups=groups,
        ssm_state_size=rng.choice([8, 12]), conv_kernel=4, chunk_size=rng.choice([8, 16]),
        num_attention_heads=kv * rng.choice([3, 5]), num_key_value_heads=kv, head_dim=rng.choice([8, 12]),
        intermediate_size=rng.choice([72, 90]), tie_word_embeddings=rng.random() < 0.5,
    )
    cfg.update(overrides)
    return ee.ModelConfig(**cfg)


@torch.no_grad()
def randomize(model, seed: int = 0):
    """Random weights everywhere (A_log, D, dt_bias, norms too), so every head behaves differently."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.copy_(torch.rand(p.shape, generator=g) * 2 - 1)
        elif name.endswith("dt_bias"):
            p.copy_(torch.rand(p.shape, generator=g) * 2 - 2.5)
        elif name.endswith("norm.weight") or name.endswith("norm_f.weight") or name.endswith(".D"):
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 / max(1, p.shape[-1]) ** 0.5 * 2))
    return model


def random_model(seed: int = 0, dtype=torch.float32, **overrides):
    cfg = tiny_config(seed, **overrides)
    return randomize(build_model(cfg, seed=seed), seed).to(dtype)


def hf_model(path):
    """transformers' NemotronHForCausalLM from a checkpoint directory (the reference)."""
    from transformers import NemotronHForCausalLM

    m = NemotronHForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return m.eval()
