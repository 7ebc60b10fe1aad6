"""Padded slices (elastic_export/padding.py): heterogeneous budgets as plain nemotron_h checkpoints that
transformers loads, computing the budget of the elastic forward.

MLP and attention padding and Mamba layers at the widest width are exact; a narrower Mamba layer is the
budget with its gated-norm epsilon multiplied by k = n_pad / n (derived in padding.py). So transformers'
logits are compared with our elastic forward of the budget, run with those epsilons, and, where no
factor applies, with the plain elastic forward."""

import contextlib
import random

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import elastic_export as ee
from core_helpers import sorted_model
from elastic_export.cli import main
from elastic_export.elastic import LayerWidths, Subnet
from elastic_export.model import gated_rms_norm
from elastic_export.nested import load_nested
from elastic_export.padding import eps_factors, norm_relative_error_bound
from elastic_export.slicing import sliced_config
from helpers import hf_model


@contextlib.contextmanager
def mamba_eps(model, subnet: Subnet, factors: dict[int, float]):
    """The elastic model with the gated-norm epsilon of kept layer j (sliced index) times factors[j]."""
    kept = [i for i, w in enumerate(subnet.layers) if w.kept]
    mixers = {j: model.backbone.layers[i].mixer for j, i in enumerate(kept) if j in factors}
    old = {j: m.eps for j, m in mixers.items()}
    for j, m in mixers.items():
        m.eps = old[j] * factors[j]
    try:
        yield model
    finally:
        for j, m in mixers.items():
            m.eps = old[j]


def greedy(logits_of, x: torch.Tensor, n: int = 10) -> torch.Tensor:
    for _ in range(n):
        x = torch.cat([x, logits_of(x)[:, -1].argmax(-1, keepdim=True)], 1)
    return x[:, -n:]


@torch.no_grad()
def check_against_elastic(model, subnet: Subnet, sliced_dir, x: torch.Tensor) -> float:
    """transformers on the slice vs our elastic forward (epsilons as derived): logits 1e-4, 10 greedy
    tokens equal. Returns the max logit difference against the plain elastic forward."""
    from elastic_export.hf_io import load_config

    cfg = load_config(sliced_dir)
    assert cfg.num_hidden_layers == sum(w.kept for w in subnet.layers)  # dropped layers are omitted
    hf = hf_model(sliced_dir)
    got = hf(x, use_cache=False).logits
    plain = model(x, subnet=subnet)
    with mamba_eps(model, subnet, eps_factors(cfg)):
        ref = model(x, subnet=subnet)
        assert (got - ref).abs().max() <= 1e-4
        tokens = greedy(lambda t: model(t, subnet=subnet), x)
    assert torch.equal(greedy(lambda t: hf(t, use_cache=False).logits, x), tokens)
    if not eps_factors(cfg):
        assert torch.equal(ref, plain)
    return (got - plain).abs().max().item()


def test_every_slice_of_the_shipped_model_loads_in_transformers(tmp_path):
    r = CliRunner().invoke(main, ["slice", "--budget", "all", "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    ck = load_nested(ee.default_model_path())
    x = torch.randint(0, ck.model.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    for name, sub in ck.budgets.items():
        check_against_elastic(ck.model.eval(), sub, tmp_path / "s" / name, x)
        out = CliRunner().invoke(main, ["inspect", str(tmp_path / "s" / name)]).output
        heterogeneous = sliced_config(ck.model.config, sub).layer_widths is not None
        assert ("layout: padded" in out) == heterogeneous and ("zero parameters" in out) == heterogeneous


def _hetero(cfg, rng: random.Random, mamba_same: bool) -> Subnet:
    """Odd random widths, the first Mamba and MLP layers dropped; Mamba layers at one width if asked."""
    while (sub := _draw(cfg, rng, mamba_same)) and sliced_config(cfg, sub).layer_widths is None:
        pass  # a draw that happens to be homogeneous: draw again
    return sub


def _draw(cfg, rng, mamba_same):
    G, kv, H, P = cfg.n_groups, cfg.num_key_value_heads, cfg.mamba_num_heads, cfg.mamba_head_dim
    m = (G * rng.randint(1, H // G), rng.randint(1, P))
    layers, seen = [], set()
    for t in cfg.layers_block_type:
        kept = t in seen or t == "full_attention"
        seen.add(t)
        if t == "linear_attention":
            h, p = m if mamba_same else (G * rng.randint(1, H // G), rng.randint(1, P))
            layers.append(LayerWidths(kept, mamba_heads=h, mamba_head_dim=p))
        elif t == "full_attention":
            layers.append(LayerWidths(kept, attn_heads=kv * rng.randint(1, cfg.num_attention_heads // kv)))
        else:
            layers.append(LayerWidths(kept, ffn=rng.randint(1, cfg.intermediate_size)))
    return Subnet(rng.randint(cfg.hidden_size // 2, cfg.hidden_size), tuple(layers))


# rank-major heads (sorted parents) with several groups and KV heads; sigmoid: act(0) != 0 in MLP and conv
LAYERS = dict(layers_block_type=["linear_attention", "mlp", "full_attention", "linear_attention", "mlp",
                                 "linear_attention", "full_attention", "mlp"])
FAMILIES = [(0, LAYERS), (5, dict(n_groups=3, mamba_num_heads=9, num_key_value_heads=3, num_attention_heads=9, **LAYERS)),
            (7, dict(mlp_hidden_act="sigmoid", mamba_hidden_act="sigmoid", use_bias=True, mlp_bias=True, **LAYERS))]


@pytest.mark.parametrize("seed,overrides", FAMILIES)
def test_random_heterogeneous_family_loads_in_transformers(seed, overrides, tmp_path):
    _, s, _ = sorted_model(seed, **overrides)
    assert s.config.head_order == "rank_major"
    rng = random.Random(seed)
    x = torch.randint(0, s.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(seed))
    for k, mamba_same in enumerate((True, False, False)):
        sub = _hetero(s.config, rng, mamba_same)
        sl = ee.slice_budget(s, sub, layout="padded")
        assert sl.config.layer_widths is None and sl.config.padded_widths is not None
        sl.save_pretrained(tmp_path / f"p{k}")
        plain_diff = check_against_elastic(s, sub, tmp_path / f"p{k}", x)
        if mamba_same:  # only MLP and attention padded: exact
            assert plain_diff <= 1e-4
        # our loader reads both layouts; the compact one is the budget exactly
        ee.slice_budget(s, sub).save_pretrained(tmp_path / f"c{k}")
        with torch.no_grad():
            ref = s(x, subnet=sub)
            assert (ee.load(tmp_path / f"c{k}")(x) - ref).abs().max() <= 1e-5
            padded = ee.load(tmp_path / f"p{k}")
            assert padded.config.padded_widths == sl.config.padded_widths
            with mamba_eps(s, sub, eps_factors(padded.config)):
                assert (padded(x) - s(x, subnet=sub)).abs().max() <= 1e-5


def test_padding_is_zeros_with_equal_counts_per_group():
    _, s, _ = sorted_model(5, **FAMILIES[1][1])
    cfg = s.config
    sub = _hetero(cfg, random.Random(3), mamba_same=False)
    compact, padded = ee.slice_budget(s, sub), ee.slice_budget(s, sub, layout="padded")
    pc, pp = compact.state_dict(), padded.state_dict()
    G, kv, hd = cfg.n_groups, cfg.num_key_value_heads, cfg.head_dim
    for j, t in enumerate(compact.config.layers_block_type):
        m, w = f"backbone.layers.{j}.mixer.", compact.config.layer_dims(j)
        if t == "full_attention":  # [kv, heads per group, hd, d]: real heads first in every KV group
            q = pp[m + "q_proj.weight"].unflatten(0, (kv, -1, hd))
            a = w["num_attention_heads"] // kv
            assert torch.equal(q[:, :a], pc[m + "q_proj.weight"].unflatten(0, (kv, a, hd)))
            assert not q[:, a:].any() and not pp[m + "o_proj.weight"].unflatten(1, (kv, -1, hd))[:, :, a:].any()
        elif t == "linear_attention":  # [G, heads per group, P]: real block in the corner of every group
            a, p = w["mamba_num_heads"] // G, w["mamba_head_dim"]
            out = pp[m + "out_proj.weight"].unflatten(1, (G, -1, padded.config.mamba_head_dim))
            assert torch.equal(out[:, :, :a, :p], pc[m + "out_proj.weight"].unflatten(1, (G, a, p)))
            rest = out.clone()
            rest[:, :, :a, :p] = 0
            assert not rest.any()
            assert not pp[m + "D"].unflatten(0, (G, -1))[:, a:].any()


@pytest.mark.parametrize("mean_square", [1e-7, 1e-5, 1e-3, 1.0])
def test_gated_norm_epsilon_effect_is_bounded(mean_square):
    """A group of n channels padded with zeros to n_pad, weight times sqrt(n / n_pad): the compact norm
    with epsilon k * eps exactly, and within norm_relative_error_bound of the compact norm."""
    g = torch.Generator().manual_seed(0)
    G, h, p, H, P, eps = 2, 2, 5, 4, 7, 1e-5
    y = torch.randn(3, h * G, p, generator=g, dtype=torch.float64)
    z = torch.randn(3, h * G, p, generator=g, dtype=torch.float64) + 2
    y = y * (mean_square / (y * F.silu(z)).pow(2).mean()).sqrt()
    w = torch.randn(h * G, p, generator=g, dtype=torch.float64)
    k = (H * P) / (h * p)

    def pad(t):  # [3, G*h, p] group-contiguous -> [3, G*H, P] zeros
        out = t.new_zeros(3, G, H, P)
        out[:, :, :h, :p] = t.unflatten(1, (G, h))
        return out.flatten(1, 2)

    compact = gated_rms_norm(y, z, w, G, "group_contiguous", eps)
    padded = gated_rms_norm(pad(y), pad(z), pad(w[None] * k ** -0.5)[0], G, "group_contiguous", eps)
    padded = padded.unflatten(1, (G, H))[:, :, :h, :p].flatten(1, 2)
    # (gated_rms_norm rounds z and the weight to float32: 1e-6 relative)
    assert torch.allclose(padded, gated_rms_norm(y, z, w, G, "group_contiguous", k * eps), rtol=1e-6, atol=0)
    gated = (y * F.silu(z)).unflatten(1, (G, h)).pow(2).mean((2, 3))  # m per (token, group)
    bound = torch.tensor([[norm_relative_error_bound(h * p, H * P, eps, m) for m in row] for row in gated.tolist()])
    rel = (padded / compact - 1).abs().unflatten(1, (G, h)).amax((2, 3))
    assert (rel <= bound + 1e-6).all()
    assert (rel >= 0.5 * bound - 1e-6).all()  # and the bound is not loose by more than 2x
