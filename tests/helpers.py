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


def tiny_moe_config(seed: int = 0, **overrides) -> ee.ModelConfig:
    """A random tiny hybrid with MoE layers beside Mamba, attention and MLP ones: 4-16 routed experts,
    top-k 1-3, one or two routing groups, latent or not, tied or not, odd sizes."""
    rng = random.Random(1000 + seed)
    n_group = rng.choice([1, 2])
    experts = n_group * rng.choice([2, 3, 5, 7]) if n_group == 2 else rng.choice([4, 5, 7, 9, 16])
    topk_group = rng.choice(range(1, n_group + 1))
    top_k = rng.choice(range(1, min(3, topk_group * experts // n_group) + 1))
    layers = ["linear_attention", "moe", "full_attention", "moe", "mlp", "linear_attention"]
    rng.shuffle(layers)
    base = tiny_config(seed, layers_block_type=layers)
    moe = dict(n_routed_experts=experts, num_experts_per_tok=top_k, n_group=n_group, topk_group=topk_group,
               moe_intermediate_size=rng.choice([10, 14, 18]), moe_shared_expert_intermediate_size=rng.choice([12, 22]),
               moe_latent_size=rng.choice([None, 20, 28]), norm_topk_prob=rng.random() < 0.7,
               routed_scaling_factor=rng.choice([1.0, 2.5]))
    moe.update(overrides)
    return base.replace(**moe)


@torch.no_grad()
def randomize(model, seed: int = 0):
    """Random weights everywhere (A_log, D, dt_bias, norms too), so every head behaves differently;
    MoE routers get a random e_score_correction_bias (of the scores' size), so that a wrong use of it
    changes which experts are chosen."""
    g = torch.Generator().manual_seed(seed)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(torch.rand(b.shape, generator=g) * 0.5 - 0.25)
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
    """transformers' NemotronHForCausalLM from a checkpoint directory (the reference). MoE experts run
    its eager implementation: its default (grouped_mm) refuses odd sizes on the CPU (strides must be
    multiples of 16 bytes)."""
    from transformers import NemotronHForCausalLM

    m = NemotronHForCausalLM.from_pretrained(str(path), dtype=torch.float32, experts_implementation="eager")
    return m.eval()
