"""Zero-shot slices equal the elastic forward; homogeneous slices load in transformers; no weight copies."""

import random

import pytest
import torch

import elastic_export as ee
from core_helpers import random_subnet, sorted_model
from elastic_export.accounting import count_params
from elastic_export.elastic import LayerWidths, Subnet, full_subnet
from elastic_export.errors import BudgetError
from helpers import hf_model, random_model

X = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(1))


# attention_bias=True: transformers builds attention without biases, and so do we (test_hf_parity.py)
@pytest.mark.parametrize("seed,overrides", [(0, {}), (1, dict(use_bias=True, mlp_bias=True)),
                                            (2, dict(attention_bias=True)), (4, dict(n_groups=3, mamba_num_heads=9))])
def test_elastic_forward_equals_slice(seed, overrides, tmp_path):
    _, s, _ = sorted_model(seed, **overrides)
    cfg = s.config
    rng = random.Random(seed)
    x = X % cfg.vocab_size
    for k in range(4):
        homogeneous = k % 2 == 0
        sub = random_subnet(cfg, rng, homogeneous, skip=0.25 if homogeneous else 0.1)
        sl = ee.slice_budget(s, sub).eval()
        assert sl.num_parameters() == count_params(cfg, sub)
        assert sl.config.num_hidden_layers == sum(w.kept for w in sub.layers)
        with torch.no_grad():
            ref = s(x, subnet=sub)
            assert (ref - sl(x)).abs().max() <= 1e-5
        out = tmp_path / f"s{k}"
        sl.save_pretrained(out)
        assert homogeneous <= (sl.config.layer_widths is None)  # homogeneous -> a plain HF config
        if sl.config.layer_widths is None:
            with torch.no_grad():
                got = hf_model(out)(x, use_cache=False).logits
            assert (ref - got).abs().max() <= 1e-4
        else:
            with torch.no_grad():
                assert (ref - ee.load(out).eval()(x)).abs().max() <= 1e-5


def test_group_aware_heads_and_group_contiguous_slice():
    _, s, simp = sorted_model(4, n_groups=3, mamba_num_heads=9, num_key_value_heads=3, num_attention_heads=6)
    cfg = s.config
    G, kv = cfg.n_groups, cfg.num_key_value_heads
    full = full_subnet(cfg)
    layers = [LayerWidths(mamba_heads=2 * G, mamba_head_dim=cfg.mamba_head_dim) if t == "linear_attention" else
              LayerWidths(attn_heads=kv) if t == "full_attention" else w
              for t, w in zip(cfg.layers_block_type, full.layers)]
    sub = Subnet(cfg.hidden_size, tuple(layers))
    sl = ee.slice_budget(s, sub)
    j = 0
    for i, t in enumerate(cfg.layers_block_type):
        if t == "linear_attention":
            A_sorted = s.backbone.layers[i].mixer.A_log.detach()
            A_slice = sl.backbone.layers[j].mixer.A_log.detach()
            assert A_slice.numel() == 2 * G
            for g in range(G):  # group g keeps exactly its rank-0 and rank-1 heads, stored contiguously
                assert torch.equal(A_slice[g * 2:(g + 1) * 2], A_sorted[[g, G + g]])
        elif t == "full_attention":
            q_sorted = s.backbone.layers[i].mixer.q_proj.weight.detach().unflatten(0, (-1, cfg.head_dim))
            q_slice = sl.backbone.layers[j].mixer.q_proj.weight.detach().unflatten(0, (-1, cfg.head_dim))
            assert torch.equal(q_slice, q_sorted[:kv])  # one head per KV group, group order
        j += 1


def test_running_a_budget_copies_no_weight():
    _, s, _ = sorted_model(0)
    cfg = s.config
    sub = random_subnet(cfg, random.Random(5), homogeneous=False, skip=0.0)
    storages = {p.untyped_storage().data_ptr() for p in s.parameters()}
    with torch.no_grad():
        _, views = s.layer_views(sub)
        for v in views:
            for t in v:
                for u in (t if isinstance(t, tuple) else (t,)):
                    if isinstance(u, torch.Tensor):
                        assert u.untyped_storage().data_ptr() in storages
        before = {n: p.data_ptr() for n, p in s.named_parameters()}
        s(X % cfg.vocab_size, subnet=sub)
        _, views_again = s.layer_views(sub)
    assert views_again is views  # cached views, built once
    assert before == {n: p.data_ptr() for n, p in s.named_parameters()}


def test_invalid_subnets_are_refused():
    m = random_model(0)  # n_groups 2, unsorted
    cfg = m.config
    full = full_subnet(cfg)
    with pytest.raises(BudgetError, match="outside"):
        ee.slice_budget(m, Subnet(cfg.hidden_size + 1, full.layers))
    i = cfg.layers_block_type.index("linear_attention")
    layers = list(full.layers)
    layers[i] = LayerWidths(mamba_heads=cfg.n_groups + 1, mamba_head_dim=cfg.mamba_head_dim)
    with pytest.raises(BudgetError, match="split evenly"):
        ee.slice_budget(m, Subnet(cfg.hidden_size, tuple(layers)))
    layers[i] = LayerWidths(mamba_heads=cfg.n_groups, mamba_head_dim=cfg.mamba_head_dim)
    with pytest.raises(BudgetError, match="rank-major"):  # a head prefix of an unsorted parent
        ee.slice_budget(m, Subnet(cfg.hidden_size, tuple(layers)))
    none_kept = tuple(LayerWidths(False, w.mamba_heads, w.mamba_head_dim, w.attn_heads, w.ffn) for w in full.layers)
    with pytest.raises(BudgetError, match="keeps no layer"):
        ee.slice_budget(m, Subnet(cfg.hidden_size, none_kept))
