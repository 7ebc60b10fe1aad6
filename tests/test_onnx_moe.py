"""The ONNX MoE layer (elastic_export/onnx_moe.py) against transformers' NemotronHMoE, run by ONNX Runtime
on the CPU: random tiny MoE mixers (4-16 experts, top-k 1-3, one or two routing groups, latent or not,
normalized or not, random e_score_correction_bias so that the bias changes the choice), the full layer and
budgets that keep a prefix of the experts (per group), of each expert's neurons, of the shared expert's
and of the embedding width, against transformers' module built at the sliced sizes with the sliced
weights; and the contrib com.microsoft.MoE form where it fits (relu/silu experts)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from elastic_export import elastic, onnx_moe
from elastic_export.elastic import LayerWidths, moe_top_k
from elastic_export.moe import MoE
from helpers import randomize, tiny_moe_config

TOL = 1e-5
CASES = {
    "plain": dict(n_routed_experts=5, num_experts_per_tok=2, n_group=1, topk_group=1, moe_latent_size=None),
    "top1_latent": dict(n_routed_experts=4, num_experts_per_tok=1, n_group=1, topk_group=1, moe_latent_size=20),
    "groups": dict(n_routed_experts=8, num_experts_per_tok=3, n_group=2, topk_group=1, moe_latent_size=None),
    "groups_latent": dict(n_routed_experts=12, num_experts_per_tok=3, n_group=2, topk_group=2, moe_latent_size=28,
                          norm_topk_prob=False, routed_scaling_factor=2.5),
    "groups_biased_scaled": dict(n_routed_experts=10, num_experts_per_tok=2, n_group=2, topk_group=1,
                                     norm_topk_prob=True, routed_scaling_factor=2.5, mlp_bias=True,
                                     moe_latent_size=20),
    "many": dict(n_routed_experts=16, num_experts_per_tok=3, n_group=1, topk_group=1, norm_topk_prob=False),
    "random_a": dict(),
    "random_b": dict(),
}


def _hf(cfg):
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMoE

    hc = NemotronHConfig.from_dict(cfg.to_dict())
    hc._experts_implementation = "eager"  # its grouped_mm default refuses odd sizes on the CPU
    return NemotronHMoE(hc).eval()


def _pair(seed: int, **overrides):
    """(our MoE mixer, transformers' NemotronHMoE with the same weights, config)."""
    cfg = tiny_moe_config(seed, **overrides)
    i = cfg.layers_block_type.index("moe")
    ours = randomize(MoE(cfg, cfg.layer_dims(i), i), seed).eval()
    ref = _hf(cfg)
    ref.load_state_dict(ours.state_dict())
    return ours, ref, cfg


def _run(tmp_path, ours, v, act, d, x, form="dense", name="moe"):
    proto, wf = onnx_moe.layer_model(ours, v, act, d, form)
    path = tmp_path / f"{name}.onnx"
    onnx_moe.save_layer_model(proto, wf, path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return torch.from_numpy(s.run(None, {"hidden": x.numpy()})[0])


def _x(seed: int, d: int, T: int = 37) -> torch.Tensor:
    return torch.randn(T, d, generator=torch.Generator().manual_seed(100 + seed))


@pytest.mark.parametrize("name,seed", [(n, s) for s, n in enumerate(CASES)])
@torch.no_grad()
def test_full_layer_equals_transformers(tmp_path, name, seed):
    ours, ref, cfg = _pair(seed, **CASES[name])
    D = cfg.hidden_size
    x = _x(seed, D)
    want = ref(x[None])[0]
    v = elastic.moe_views(ours, elastic.full_subnet(cfg).layers[ours.layer_idx], D)
    for form in ("dense", "gather"):
        got = _run(tmp_path, ours, v, cfg.mlp_hidden_act, D, x, form=form, name=form)
        assert (got - want).abs().max().item() <= TOL, form
    # the bias steers the choice: without it transformers' output moves (so the test above could fail)
    ref.gate.e_score_correction_bias.zero_()
    assert (ref(x[None])[0] - want).abs().max().item() > 1e-3


def _rank_major(ours, cfg):
    """Our mixer with its experts in rank-major order over the routing groups (as a sorted nested
    checkpoint stores them): position j*G + g holds expert g*r + j of the group-contiguous order."""
    G = cfg.n_group
    E = ours.gate.weight.shape[0]
    r = E // G
    perm = torch.tensor([(pos % G) * r + pos // G for pos in range(E)])
    cfg2 = cfg.replace(head_order="rank_major")
    rm = MoE(cfg2, cfg2.layer_dims(ours.layer_idx), ours.layer_idx).eval()
    sd = ours.state_dict()
    for k in ("gate.weight", "gate.e_score_correction_bias", "experts.up_proj", "experts.down_proj"):
        sd[k] = sd[k][perm]
    rm.load_state_dict(sd)
    return rm, cfg2


def _sliced_hf(ref, cfg, per_group: int, f: int, s: int, d: int):
    """transformers' NemotronHMoE at the budget's sizes, with the budget's weights sliced from ``ref``:
    the first ``per_group`` experts of each routing group (group-contiguous, as transformers stores
    them), f neurons each, s shared neurons, embedding width d."""
    G = cfg.n_group
    E = ref.gate.weight.shape[0]
    r = E // G
    keep = torch.tensor([gg * r + j for gg in range(G) for j in range(per_group)])
    e = len(keep)
    small = cfg.replace(hidden_size=d, n_routed_experts=e, moe_intermediate_size=f,
                        moe_shared_expert_intermediate_size=s, num_experts_per_tok=moe_top_k(cfg, e))
    out = _hf(small)
    L = cfg.moe_latent_size
    din = d if L is None else L
    sd, full = out.state_dict(), ref.state_dict()
    for k in sd:
        t = full[k]
        if k == "gate.weight":
            t = t[keep, :d]
        elif k == "gate.e_score_correction_bias":
            t = t[keep]
        elif k == "experts.up_proj":
            t = t[keep, :f, :din]
        elif k == "experts.down_proj":
            t = t[keep, :din, :f]
        elif k == "shared_experts.up_proj.weight":
            t = t[:s, :d]
        elif k == "shared_experts.up_proj.bias":
            t = t[:s]
        elif k == "shared_experts.down_proj.weight":
            t = t[:d, :s]
        elif k in ("shared_experts.down_proj.bias", "fc2_latent_proj.bias"):
            t = t[:d]
        elif k == "fc1_latent_proj.weight":
            t = t[:, :d]
        elif k == "fc2_latent_proj.weight":
            t = t[:d]
        sd[k] = t.clone()
    out.load_state_dict(sd)
    return out


BUDGETS = [  # (case, experts kept per group, expert width fraction, shared width fraction, embedding width cut)
    ("plain", 2, 1.0, 1.0, 0),  # top-k 2 of 2 kept: all
    ("many", 2, 0.5, 0.5, 3),  # top-k 3 capped at the 2 kept
    ("groups", 2, 1.0, 0.5, 0),  # 4 of 8 experts (2 per group), top-k 3 capped at topk_group * 2 = 2
    ("groups_latent", 3, 0.5, 1.0, 5),  # 6 of 12, top-k 3 of topk_group * 3 = 6
    ("groups_biased_scaled", 3, 0.7, 0.6, 2),
    ("top1_latent", 2, 0.6, 0.5, 1),
]


@pytest.mark.parametrize("name,per_group,ff,sf,cut", BUDGETS)
@torch.no_grad()
def test_budget_equals_the_sliced_transformers_module(tmp_path, name, per_group, ff, sf, cut):
    seed = list(CASES).index(name)
    ours, ref, cfg = _pair(seed, **CASES[name])
    rm, cfg2 = _rank_major(ours, cfg)
    G, F, S = cfg.n_group, cfg.moe_intermediate_size, cfg.moe_shared_expert_intermediate_size
    D = cfg.hidden_size
    d, f, s = D - cut, max(1, int(F * ff)), max(1, int(S * sf))
    w = LayerWidths(experts=per_group * G, expert_ffn=f, shared_ffn=s)
    elastic.validate_subnet(cfg2, elastic.Subnet(d, tuple(w if i == ours.layer_idx else lw for i, lw in
                                                           enumerate(elastic.full_subnet(cfg2).layers))))
    v = elastic.moe_views(rm, w, d)
    x = _x(seed, d)
    want = _sliced_hf(ref, cfg, per_group, f, s, d)(x[None])[0]
    for form in ("dense", "gather"):
        got = _run(tmp_path, rm, v, cfg.mlp_hidden_act, d, x, form=form, name=form)
        assert (got - want).abs().max().item() <= TOL, form
    assert (rm(x, v) - want).abs().max().item() <= TOL  # and the elastic forward agrees
    # the full rank-major layer is still transformers' (the reorder is function preserving)
    full = elastic.moe_views(rm, elastic.full_subnet(cfg2).layers[ours.layer_idx], D)
    xf = _x(seed + 1, D)
    assert (_run(tmp_path, rm, full, cfg.mlp_hidden_act, D, xf, name="full") - ref(xf[None])[0]).abs().max() <= TOL


@pytest.mark.parametrize("act,name", [("relu", "plain"), ("silu", "groups_latent"), ("gelu_pytorch_tanh", "many"),
                                      ("relu", "groups")])
@torch.no_grad()
def test_contrib_form_equals_transformers_where_it_fits(tmp_path, act, name):
    seed = list(CASES).index(name)
    ours, ref, cfg = _pair(seed, mlp_hidden_act=act, **CASES[name])
    D = cfg.hidden_size
    x = _x(seed, D)
    v = elastic.moe_views(ours, elastic.full_subnet(cfg).layers[ours.layer_idx], D)
    assert onnx_moe.contrib_unfit(act, v, cfg.moe_intermediate_size) is None
    got = _run(tmp_path, ours, v, act, D, x, form="contrib")
    assert (got - ref(x[None])[0]).abs().max().item() <= TOL
    # a budget with fewer experts (a row range of the same weights) and a narrower embedding
    e = 2 * cfg.n_group
    vb = elastic.moe_views(ours, LayerWidths(experts=e, expert_ffn=cfg.moe_intermediate_size,
                                             shared_ffn=cfg.moe_shared_expert_intermediate_size), D - 1) \
        if cfg.n_group == 1 else None
    if vb is not None:
        xb = _x(seed, D - 1)
        dense = _run(tmp_path, ours, vb, act, D - 1, xb, name="dense_b")
        contrib = _run(tmp_path, ours, vb, act, D - 1, xb, form="contrib", name="contrib_b")
        assert (dense - contrib).abs().max().item() <= TOL
        assert (dense - ours(xb, vb)).abs().max().item() <= TOL


def test_contrib_form_says_where_it_does_not_fit():
    ours, _, cfg = _pair(0, **CASES["plain"])
    full = elastic.full_subnet(cfg).layers[ours.layer_idx]
    v = elastic.moe_views(ours, full, cfg.hidden_size)
    assert "relu2" in onnx_moe.contrib_unfit("relu2", v, cfg.moe_intermediate_size)
    assert "gelu" in onnx_moe.contrib_unfit("gelu", v, cfg.moe_intermediate_size)  # erf gelu: the kernel's is tanh
    narrow = elastic.moe_views(ours, LayerWidths(experts=full.experts, expert_ffn=3, shared_ffn=full.shared_ffn),
                               cfg.hidden_size)
    assert "row range" in onnx_moe.contrib_unfit("relu", narrow, cfg.moe_intermediate_size)
    with pytest.raises(ValueError, match="relu2"):
        onnx_moe.layer_model(ours, v, "relu2", cfg.hidden_size, form="contrib")


def test_weights_are_row_ranges_of_one_file(tmp_path):
    """Every weight the layer reads is an external row range of the mixer's weight file fed straight to its
    consumer (no Slice/Transpose/Reshape of a weight); the router stays float32 in a bf16 file."""
    ours, _, cfg = _pair(3, **CASES["groups_latent"])
    rm, cfg2 = _rank_major(ours, cfg)
    v = elastic.moe_views(rm, LayerWidths(experts=4, expert_ffn=5, shared_ffn=7), cfg.hidden_size - 2)
    for dtype, form in ((torch.float32, "dense"), (torch.bfloat16, "dense"), (torch.float32, "gather")):
        proto, wf = onnx_moe.layer_model(rm, v, cfg.mlp_hidden_act, cfg.hidden_size - 2, form, dtype=dtype)
        ext = {t.name: t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
        assert {n.split("[")[0] for n in ext} >= {"gate.weight", "experts.up_proj", "experts.down_proj",
                                                  "shared_experts.up_proj.weight", "fc1_latent_proj.weight"}
        for t in ext.values():
            kv = {e.key: e.value for e in t.external_data}
            assert int(kv["offset"]) + int(kv["length"]) <= wf.nbytes
            if t.name.startswith("gate."):
                assert t.data_type == onnx.TensorProto.FLOAT
        for n in proto.graph.node:
            if set(ext) & set(n.input):
                assert n.op_type in ("Gemm", "MatMul", "Add", "Cast", "Gather"), (n.op_type, n.input)


# ---- whole models: export_family on tiny MoE hybrids against the torch elastic forward -------------

@pytest.mark.parametrize("seed,overrides,form", [(0, CASES["groups_latent"], "auto"), (1, CASES["plain"], "auto"),
                                                 (2, CASES["groups"], "dense"), (3, {}, "gather")])
def test_family_prefill_and_decode_match_torch(tmp_path, seed, overrides, form):
    """Prefill and cached decode graphs of the full model and of random budgets (experts per group,
    expert and shared widths, embedding width, depth) of tiny MoE hybrids with Mamba, attention and MLP
    layers: logits as the torch elastic forward's."""
    from elastic_export.model import build_model
    from elastic_export.onnx_export import export_family
    from elastic_fixtures import family
    from test_onnx_export import _check

    cfg = tiny_moe_config(seed, head_order="rank_major", **overrides)
    model = randomize(build_model(cfg, seed=seed), seed).eval()
    budgets = family(cfg, seed, 3)
    assert any(w.experts is not None and w.experts < cfg.n_routed_experts for s in budgets.values()
               for w in s.layers)
    export_family(model, budgets, tmp_path, ssm_op="standard" if seed % 2 else "decomposed", moe_form=form)
    decode = onnx.load(str(tmp_path / "full.decode.onnx"), load_external_data=False)
    assert any(n.op_type == "Gather" and n.input[0].startswith("backbone.layers") and "experts" in n.input[0]
               for n in decode.graph.node) == (form in ("auto", "gather"))
    _check(model, budgets, tmp_path, steps=3, padded=seed == 1, b=2, l=21)


def test_family_contrib_form_matches_torch_or_is_refused(tmp_path):
    from elastic_export.errors import ConfigError
    from elastic_export.model import build_model
    from elastic_export.onnx_export import export_family
    from test_onnx_export import _check

    cfg = tiny_moe_config(5, head_order="rank_major", mlp_hidden_act="silu", **CASES["groups"])
    model = randomize(build_model(cfg, seed=5), 5).eval()
    full = elastic.full_subnet(cfg)
    fewer = elastic.Subnet(cfg.hidden_size - 3, tuple(
        LayerWidths(experts=4, expert_ffn=w.expert_ffn, shared_ffn=w.shared_ffn // 2) if w.experts else w
        for w in full.layers))
    budgets = {"full": full, "fewer": fewer}
    export_family(model, budgets, tmp_path, moe_form="contrib")
    _check(model, budgets, tmp_path, steps=2, b=2, l=13)
    narrow = elastic.Subnet(cfg.hidden_size, tuple(
        LayerWidths(experts=w.experts, expert_ffn=3, shared_ffn=w.shared_ffn) if w.experts else w for w in full.layers))
    with pytest.raises(ConfigError, match="expert width of 3"):
        export_family(model, {"narrow": narrow}, tmp_path / "x", moe_form="contrib")
    relu2 = randomize(build_model(cfg.replace(mlp_hidden_act="relu2"), seed=5), 5).eval()
    with pytest.raises(ConfigError, match="relu2 is CUDA-only"):
        export_family(relu2, {"full": full}, tmp_path / "y", moe_form="contrib")


@torch.no_grad()
def test_cli_build_of_a_moe_checkpoint_runs_in_the_ort_engine(tmp_path):
    """`elastic-export build` on an HF-format tiny MoE hybrid, then the ONNX Runtime engine (weights
    shared across sessions as OrtValue views): prefill and decode logits as our torch model's."""
    from click.testing import CliRunner

    from elastic_export.cli import main
    from elastic_export.model import build_model
    from engines.ort_engine import OrtEngine

    cfg = tiny_moe_config(6, **CASES["groups_latent"])
    model = randomize(build_model(cfg, seed=6), 6).eval()
    model.save_pretrained(tmp_path / "hf")
    r = CliRunner().invoke(main, ["build", str(tmp_path / "hf"), "--target", "onnx", "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    eng = OrtEngine(tmp_path / "b")
    assert eng.share
    ids = torch.randint(0, cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(6))
    cache = model.new_cache()
    assert (eng.prefill(ids) - model(ids, cache=cache)).abs().max().item() <= 1e-4
    for step in range(3):
        tok = torch.randint(0, cfg.vocab_size, (2, 1), generator=torch.Generator().manual_seed(step))
        assert (eng.decode(tok) - model(tok, cache=cache)[:, -1]).abs().max().item() <= 1e-4
