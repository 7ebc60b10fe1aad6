"""Accounting on configs alone, and budget search from ranks (tiny and at real scale on the meta device)."""

import time

import pytest
import torch

import elastic_export as ee
from core_helpers import sorted_model
from elastic_export.accounting import count_params, family_weights, memory
from elastic_export.errors import BudgetError
from elastic_export.importance import Importance
from elastic_export.search import parse_budget, plan_budgets, plan_text, search_subnet
from helpers import tiny_config

NANO = "nemotron-nano-v2-12b"


@pytest.mark.parametrize("overrides", [{}, dict(use_bias=True, attention_bias=True, mlp_bias=True),
                                       dict(tie_word_embeddings=True), dict(use_conv_bias=False)])
def test_count_params_matches_the_model(overrides):
    for seed in range(3):
        cfg = tiny_config(seed, **overrides)
        with torch.device("meta"):
            m = ee.NemotronHForCausalLM(cfg)
        assert count_params(cfg) == m.num_parameters()


def test_memory_formulas():
    cfg = ee.preset(NANO)
    m = memory(cfg, dtype="bfloat16", context=1000, batch=3)
    assert m.weights == 2 * count_params(cfg) == 2 * 12_310_001_152
    assert m.kv_cache == 6 * 2 * 3 * 8 * 1000 * 128 * 2  # 6 attention layers, K and V
    assert m.ssm_state == 28 * 3 * 128 * 80 * 128 * 4  # float32 at every precision
    assert m.conv_state == 28 * 3 * (128 * 80 + 2 * 8 * 128) * 3 * 2
    assert m.total == m.weights + m.kv_cache + m.ssm_state + m.conv_state + m.activations


@pytest.mark.parametrize("mode", ["homogeneous", "heterogeneous"])
def test_real_scale_plan_of_9b_and_6b(mode):
    cfg = ee.preset(NANO)
    t0 = time.perf_counter()
    budgets = plan_budgets(cfg, ["9B", "6B"], mode=mode)
    assert time.perf_counter() - t0 < 10
    assert list(budgets) == ["full", "9B", "6B"]
    for name, target in (("9B", 9e9), ("6B", 6e9)):
        s = budgets[name]
        p = count_params(cfg, s)
        assert 0.97 * target <= p <= target
        assert s.hidden % 64 == 0
        for t, w in zip(cfg.layers_block_type, s.layers):
            if t == "linear_attention":
                assert w.mamba_heads % cfg.n_groups == 0
            elif t == "full_attention":
                assert w.attn_heads % cfg.num_key_value_heads == 0
            else:
                assert w.ffn % 64 == 0
    fam = family_weights(cfg, list(budgets.values()), "bfloat16")
    assert fam["nested"] / 1e9 == pytest.approx(24.62, abs=0.01)  # paper Table 3: 24 GB for 6B + 9B + 12B
    assert 41.5 <= sum(fam["per_budget"][:2]) / 1e9 <= 43.0  # separate 12B + 9B: about 42 GB
    text = plan_text(cfg, budgets)
    assert "nested (one copy, all 3 budgets): 24.62 GB" in text and "separate full + 9B: 42." in text


def test_percent_targets_and_constraints_on_a_tiny_config():
    cfg = tiny_config(4, n_groups=3, mamba_num_heads=9, num_key_value_heads=3, num_attention_heads=6)
    full = count_params(cfg)
    for mode in ("homogeneous", "heterogeneous"):
        budgets = plan_budgets(cfg, ["75%", "half=50%"], mode=mode)
        assert list(budgets) == ["full", "75pct", "half"]
        for name, frac in (("75pct", 0.75), ("half", 0.5)):
            s = budgets[name]
            assert count_params(cfg, s) <= frac * full
            assert all(w.mamba_heads % 3 == 0 for t, w in zip(cfg.layers_block_type, s.layers)
                       if t == "linear_attention")
            assert all(w.attn_heads % 3 == 0 for t, w in zip(cfg.layers_block_type, s.layers)
                       if t == "full_attention")


def test_search_prunes_unimportant_components_first():
    _, s, simp = sorted_model(1, depth="oneshot")
    cfg = s.config
    i = cfg.layers_block_type.index("mlp")
    ffn = simp.layers[i]["ffn"].clone()
    ffn[cfg.intermediate_size // 4:] = 0  # three quarters of this layer's neurons carry no importance
    layers = [dict(d) for d in simp.layers]
    layers[i] = {"ffn": ffn}
    imp = Importance(simp.hidden, layers, simp.depth, simp.depth_order)
    target = count_params(cfg) - cfg.hidden_size * cfg.intermediate_size  # about a quarter of that layer
    sub = search_subnet(cfg, target, "heterogeneous", imp, depth=False)
    assert sub.layers[i].ffn < cfg.intermediate_size and sub.hidden == cfg.hidden_size
    assert all(w.kept for w in sub.layers)
    with_depth = search_subnet(cfg, count_params(cfg) // 2, "homogeneous", simp, depth=True)
    dropped = [j for j, w in enumerate(with_depth.layers) if not w.kept]
    assert dropped and set(dropped) == set(simp.depth_order[:len(dropped)])  # along the depth ranking


def test_bad_targets():
    cfg = tiny_config(0)
    with pytest.raises(BudgetError, match="more than the parent"):
        parse_budget("150%", cfg)
    with pytest.raises(BudgetError, match="more than the parent"):
        parse_budget("20B", cfg)
    with pytest.raises(BudgetError, match="cannot read"):
        parse_budget("lots", cfg)
    with pytest.raises(BudgetError, match="cannot reach"):
        search_subnet(cfg, 10, "homogeneous")
    with pytest.raises(BudgetError, match="given twice"):
        plan_budgets(cfg, ["a=50%", "a=40%"])
    with pytest.raises(BudgetError, match="depth ranks"):
        search_subnet(cfg, count_params(cfg) // 2, depth=True)
