"""Sorting by importance is function preserving and puts heads in group-aware rank-major order."""

import pytest
import torch

from core_helpers import calib_ids, sorted_model
from elastic_export.elastic import group_members
from elastic_export.importance import compute_importance
from elastic_export.sorting import permutations, sort_model
from helpers import random_model

BIASES = dict(use_bias=True, mlp_bias=True)  # (attention never has biases: test_hf_parity.py)


@pytest.mark.parametrize("seed,overrides", [(0, {}), (1, {}), (2, {}), (3, BIASES), (4, dict(n_groups=3,
                         mamba_num_heads=9, num_key_value_heads=3, num_attention_heads=6))])
def test_sorted_logits_equal_unsorted(seed, overrides):
    m, s, _ = sorted_model(seed, **overrides)
    x = torch.randint(0, m.config.vocab_size, (2, 29), generator=torch.Generator().manual_seed(9))
    assert s.config.head_order == "rank_major" and m.config.head_order == "group_contiguous"
    with torch.no_grad():
        diff = (m(x) - s(x)).abs().max().item()
    assert diff <= 1e-5, diff


def test_sorting_heterogeneous_parent_and_resorting():
    m = random_model(5)
    cfg = m.config
    widths = [{"mamba_num_heads": cfg.n_groups * (1 + i % 2)} if t == "linear_attention" else
              {"intermediate_size": 30 + i} if t == "mlp" else {} for i, t in enumerate(cfg.layers_block_type)]
    from elastic_export.model import build_model
    from helpers import randomize
    het = randomize(build_model(cfg.replace(layer_widths=widths)), 5).eval()
    imp = compute_importance(het, calib_ids(cfg), depth="none")
    s, simp = sort_model(het, imp)
    s2, _ = sort_model(s, compute_importance(s, calib_ids(cfg, seed=3), depth="none"))  # rank-major input
    x = calib_ids(cfg, 2, 17, seed=5)
    with torch.no_grad():
        assert (het(x) - s(x)).abs().max() <= 1e-5
        assert (het(x) - s2(x)).abs().max() <= 1e-5


def test_sorted_scores_descend_and_heads_keep_their_group():
    m = random_model(0)  # n_groups 2, 2 KV heads
    cfg = m.config
    assert cfg.n_groups > 1 and cfg.num_key_value_heads > 1
    imp = compute_importance(m, calib_ids(cfg), depth="none")
    perms = permutations(cfg, imp)
    _, simp = sort_model(m, imp)
    assert torch.all(simp.hidden[:-1] >= simp.hidden[1:])
    for i, t in enumerate(cfg.layers_block_type):
        sc = simp.layers[i]
        if t == "mlp":
            assert torch.all(sc["ffn"][:-1] >= sc["ffn"][1:])
            continue
        G = cfg.n_groups if t == "linear_attention" else cfg.num_key_value_heads
        H = sc["heads"].numel()
        old_groups = group_members(H, G, "group_contiguous")
        for g, members in enumerate(group_members(H, G, "rank_major")):
            assert torch.all(sc["heads"][members][:-1] >= sc["heads"][members][1:])  # ranked in the group
            assert set(perms.layers[i]["heads"][members].tolist()) == set(old_groups[g])  # never changes group
        if t == "linear_attention":
            assert torch.all(sc["channels"][:-1] >= sc["channels"][1:])


def test_sort_leaves_input_unchanged():
    m = random_model(1)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    sort_model(m, compute_importance(m, calib_ids(m.config), depth="none"))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
