"""Nested quantization (elastic_export.quant): prefix safety bit for bit, the block plan, the codes."""

from __future__ import annotations

import random

import pytest
import torch

import elastic_export as ee
from elastic_export import quant
from elastic_export.elastic import LayerWidths, Subnet, full_subnet
from elastic_export.errors import BudgetError, ConfigError
from elastic_export.importance import compute_importance
from elastic_export.slicing import slice_state
from elastic_export.sorting import sort_model
from helpers import random_model, tiny_config, tiny_moe_config
from core_helpers import calib_ids


def even_subnet(cfg, rng: random.Random) -> Subnet:
    """A random heterogeneous budget whose every width is even (so blocks of 2 stay whole)."""
    def ev(n):  # an even width in 2..n (n even) or n itself
        return n if n % 2 else 2 * rng.randint(1, n // 2)

    layers = []
    for i, t in enumerate(cfg.layers_block_type):
        d = cfg.layer_dims(i)
        kept = rng.random() > 0.25 or i == 0
        if t == "linear_attention":
            G = cfg.n_groups
            layers.append(LayerWidths(kept, mamba_heads=G * rng.randint(1, d["mamba_num_heads"] // G),
                                      mamba_head_dim=ev(d["mamba_head_dim"])))
        elif t == "full_attention":
            kv = cfg.num_key_value_heads
            layers.append(LayerWidths(kept, attn_heads=kv * rng.randint(1, d["num_attention_heads"] // kv)))
        elif t == "moe":
            ng = cfg.n_group
            layers.append(LayerWidths(kept, experts=ng * rng.randint(2, d["n_routed_experts"] // ng),
                                      expert_ffn=ev(d["moe_intermediate_size"]),
                                      shared_ffn=ev(d["moe_shared_expert_intermediate_size"])))
        else:
            layers.append(LayerWidths(kept, ffn=ev(d["intermediate_size"])))
    return Subnet(ev(cfg.hidden_size), tuple(layers))



def _family(cfg, seed):
    from elastic_export.model import build_model
    from helpers import randomize
    m = randomize(build_model(cfg, seed=seed), seed).eval()
    imp = compute_importance(m, calib_ids(cfg, seed=seed), batch_size=4)
    s, _ = sort_model(m, imp)  # rank-major heads (and experts over routing groups)
    rng = random.Random(seed)
    return s.eval(), {f"b{k}": even_subnet(s.config, rng) for k in range(3)}


def _same(a, b):
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.int8), b.view(torch.int8)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def check_prefix_safe(model, budgets, spec):
    sd = model.state_dict()
    plan = quant.quant_plan(model.config, budgets, {k: tuple(v.shape) for k, v in sd.items()}, spec)
    assert plan, "nothing was quantized"
    qs = quant.quantize_state(sd, plan, spec)
    for name, sub in {"full": full_subnet(model.config), **budgets}.items():
        got, bplan = quant.slice_quantized(model, qs, plan, sub)
        ref = quant.quantize_state(slice_state(model, sub), bplan, spec)  # quantize the sliced budget
        assert got.keys() == ref.keys()
        for k, r in ref.items():
            if k in bplan:
                assert _same(got[k][0], r[0]) and torch.equal(got[k][1], r[1]), (spec.format, name, k)
            else:
                assert torch.equal(got[k], r), (name, k)
    return plan


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("method", ["rtn", "mse"])
@pytest.mark.parametrize("seed", [0, 3])
def test_slicing_the_quantized_family_is_quantizing_the_slice(fmt, method, seed):
    cfg = tiny_config(seed, hidden_size=48, mamba_head_dim=10, head_dim=8, intermediate_size=90)
    model, budgets = _family(cfg, seed)
    plan = check_prefix_safe(model, budgets, quant.QuantSpec(fmt, block=8, method=method, min_block=2))
    assert set(plan.values()) <= {2, 4, 8}


@pytest.mark.parametrize("seed", [1, 2])
def test_prefix_safety_moe(seed):
    cfg = tiny_moe_config(seed, moe_intermediate_size=14, moe_shared_expert_intermediate_size=22)
    cfg = cfg.replace(hidden_size=48, mamba_head_dim=10, head_dim=8, intermediate_size=90)
    model, budgets = _family(cfg, seed)
    plan = check_prefix_safe(model, budgets, quant.QuantSpec("int4", block=8, min_block=2))
    assert any("experts" in k for k in plan)
    assert not any(k.endswith("gate.weight") for k in plan)  # the router stays float32


def test_shipped_model_every_budget_bit_for_bit():
    m = ee.load(ee.default_model_path())
    budgets = {k: v for k, v in m.budgets.items() if k != "full"}
    plan = check_prefix_safe(m, budgets, quant.QuantSpec("int4", block=32))
    # 50pct keeps 24 of each Mamba head's 32 channels: out_proj falls back to blocks of 8
    assert plan["backbone.layers.0.mixer.out_proj.weight"] == 8
    assert plan["backbone.layers.1.mixer.up_proj.weight"] == 32  # hidden 256 / 224: 32 divides both


def test_codes_against_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 96, generator=g) * torch.rand(7, 1, generator=g)
    for fmt, qmax in (("int8", 127), ("int4", 7)):
        q, s = quant.quantize(w, quant.QuantSpec(fmt, block=32))
        wb = w.double().view(7, 3, 32)
        s64 = wb.abs().amax(-1) / qmax
        q64 = torch.round(wb / s64.unsqueeze(-1)).clamp(-qmax, qmax)
        assert torch.equal(q.view(7, 3, 32).double(), q64)
        assert torch.allclose(s.double(), s64, rtol=1e-6)
        err = (quant.dequantize(q, s).double() - w.double()).abs().view(7, 3, 32)
        assert (err <= s64.unsqueeze(-1) / 2 + 1e-6).all()  # round to nearest: half a step at most


def test_mse_never_worse_than_rtn_and_importance_weighting():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=g)
    w[0, 3] = 9.0  # an outlier: clipping it pays off
    imp = torch.rand(64, generator=g) + 0.1
    e = {}
    for method in ("rtn", "mse"):
        q, s = quant.quantize(w, quant.QuantSpec("int4", block=32, method=method), importance=imp)
        e[method] = (((quant.dequantize(q, s) - w) ** 2) * imp).sum(-1)
    assert (e["mse"] <= e["rtn"] + 1e-6).all() and e["mse"].sum() < e["rtn"].sum()


def test_pack_int4_round_trip_and_nibble_order():
    q = torch.randint(-7, 8, (5, 34), dtype=torch.int8)
    p = quant.pack_int4(q)
    assert p.shape == (5, 17) and p.dtype == torch.uint8
    assert torch.equal(quant.unpack_int4(p), q)
    assert int(p[0, 0]) == (int(q[0, 0]) + 8) | ((int(q[0, 1]) + 8) << 4)


def test_what_stays_float():
    spec = quant.QuantSpec("int8")
    for name in ("backbone.layers.0.mixer.A_log", "backbone.layers.0.mixer.D", "backbone.layers.0.mixer.dt_bias",
                 "backbone.layers.0.mixer.conv1d.weight", "backbone.layers.0.norm.weight",
                 "backbone.layers.0.mixer.norm.weight", "backbone.norm_f.weight", "backbone.layers.1.mixer.gate.weight",
                 "backbone.layers.1.mixer.gate.e_score_correction_bias", "backbone.layers.0.mixer.in_proj.bias"):
        assert not quant.quantizable(name, spec), name
    assert quant.quantizable("backbone.layers.0.mixer.in_proj.weight", spec)
    assert quant.quantizable("backbone.layers.1.mixer.experts.up_proj", spec)
    assert not quant.quantizable("lm_head.weight", quant.QuantSpec("int8", lm_head=False))
    assert not quant.quantizable("backbone.embeddings.weight", quant.QuantSpec("int8", embeddings=False))


def test_a_budget_that_cuts_every_block_is_refused_by_name():
    cfg = tiny_config(0, hidden_size=48, intermediate_size=90)
    m = random_model(0, hidden_size=48, intermediate_size=90)
    full = full_subnet(cfg)
    odd = Subnet(47, full.layers)  # 47 columns: no block of 8 or 2 survives
    with pytest.raises(BudgetError) as e:
        quant.quant_plan(cfg, {"odd": odd}, {k: tuple(v.shape) for k, v in m.state_dict().items()},
                         quant.QuantSpec("int4", block=32))
    assert "budget odd: width 47" in str(e.value)


def test_bad_spec():
    with pytest.raises(ConfigError, match="unknown quantization format"):
        quant.QuantSpec("int3")
    with pytest.raises(ConfigError, match="power of two"):
        quant.QuantSpec("int4", block=48)


def test_the_refusal_names_the_budget_that_cuts_even_when_another_skips_the_layer():
    cfg = tiny_config(0, hidden_size=48, intermediate_size=90)
    m = random_model(0, hidden_size=48, intermediate_size=90)
    full = full_subnet(cfg)
    i = cfg.layers_block_type.index("mlp")
    skip = Subnet(48, tuple(LayerWidths(False, ffn=w.ffn) if j == i else w for j, w in enumerate(full.layers)))
    odd = Subnet(48, tuple(LayerWidths(True, ffn=45) if j == i else w for j, w in enumerate(full.layers)))
    with pytest.raises(BudgetError) as e:
        quant.quant_plan(cfg, {"skips": skip, "odd": odd}, {k: tuple(v.shape) for k, v in m.state_dict().items()},
                         quant.QuantSpec("int4", block=32, min_block=2))
    assert f"layers.{i}.mixer.down_proj" in str(e.value) and "budget odd: width 45" in str(e.value)
