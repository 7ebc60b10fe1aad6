"""MoE layers (Nemotron 3) against transformers' NemotronHMoE: random tiny hybrids with MoE, Mamba,
attention and MLP layers (4-16 experts, top-k 1-3, one or two routing groups, latent or not, tied or
not, odd sizes, random e_score_correction_bias), checkpoints both ways and in both expert layouts,
cached prefill and the decode step, and budgets that keep a prefix of the experts against the sliced
standalone model in transformers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import elastic_export as ee
from elastic_export.cache import StepState
from elastic_export.elastic import LayerWidths, Subnet, full_subnet, moe_top_k
from elastic_export.errors import BudgetError, CheckpointError
from elastic_export.model import build_model
from elastic_export.slicing import slice_budget
from helpers import hf_model, randomize, tiny_moe_config

TOL = 1e-4
CASES = {  # explicit corners on top of the random draw of tiny_moe_config
    "plain": dict(n_routed_experts=5, num_experts_per_tok=2, n_group=1, topk_group=1, moe_latent_size=None),
    "top1_latent": dict(n_routed_experts=4, num_experts_per_tok=1, n_group=1, topk_group=1, moe_latent_size=20),
    "groups": dict(n_routed_experts=8, num_experts_per_tok=3, n_group=2, topk_group=1, moe_latent_size=None),
    "groups_latent": dict(n_routed_experts=12, num_experts_per_tok=3, n_group=2, topk_group=2, moe_latent_size=28,
                          norm_topk_prob=False, routed_scaling_factor=2.5),
    "many_tied": dict(n_routed_experts=16, num_experts_per_tok=2, n_group=1, topk_group=1, tie_word_embeddings=True),
    "random": dict(),
}


def _model(seed: int, **overrides):
    cfg = tiny_moe_config(seed, **overrides)
    return randomize(build_model(cfg, seed=seed), seed).eval()


def _ids(cfg, seed: int, b: int = 2, L: int | None = None):
    L = L or 2 * cfg.chunk_size + 5
    return torch.randint(3, cfg.vocab_size, (b, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,seed", [(n, s) for s, n in enumerate(CASES)])
@torch.no_grad()
def test_ours_equals_transformers_both_ways(tmp_path, name, seed):
    ours = _model(seed, **CASES[name])
    cfg = ours.config
    assert cfg.has_moe and any(t == "mlp" for t in cfg.layers_block_type)
    ids = _ids(cfg, seed)
    ours.save_pretrained(tmp_path / "ours")
    ref = hf_model(tmp_path / "ours")
    want = ref(ids).logits
    assert (ours(ids) - want).abs().max().item() <= TOL
    # transformers writes it back (its own save_pretrained), we read it: the same logits
    ref.save_pretrained(str(tmp_path / "theirs"))
    back = ee.load(tmp_path / "theirs")
    assert (back(ids) - want).abs().max().item() <= TOL
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values()))


@torch.no_grad()
def test_a_transformers_built_model_loads_here(tmp_path):
    """transformers builds and initializes the MoE model itself; we read its checkpoint."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    cfg = tiny_moe_config(3, n_routed_experts=6, num_experts_per_tok=2, n_group=2, topk_group=1)
    torch.manual_seed(3)
    ref = NemotronHForCausalLM(NemotronHConfig.from_dict(cfg.to_dict()))
    ref.config._experts_implementation = "eager"
    randomize(ref, 3).eval()
    ref.save_pretrained(str(tmp_path / "theirs"))
    ids = _ids(cfg, 3)
    assert (ee.load(tmp_path / "theirs")(ids) - ref(ids).logits).abs().max().item() <= TOL


@torch.no_grad()
def test_the_score_bias_steers_the_choice_and_only_the_choice():
    """The random e_score_correction_bias changes which experts are chosen (so a test would see a
    router that ignores it); the weights are the plain scores of the chosen experts."""
    model = _model(1, n_routed_experts=9, num_experts_per_tok=2)
    i = model.config.layers_block_type.index("moe")
    mixer = model.backbone.layers[i].mixer
    _, views = model.layer_views(None)
    x = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    w, idx = mixer.route(x, views[i])
    w0, idx0 = mixer.route(x, views[i]._replace(score_bias=torch.zeros_like(views[i].score_bias)))
    assert not torch.equal(idx.sort(-1)[0], idx0.sort(-1)[0])
    scores = torch.sigmoid(x @ views[i].Wr.T)
    expect = scores.gather(1, idx)
    if model.config.norm_topk_prob:
        expect = expect / expect.sum(-1, keepdim=True)
    assert torch.allclose(w, expect * model.config.routed_scaling_factor, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 2, 5])
@torch.no_grad()
def test_cached_prefill_and_decode_step_equal_the_full_forward(seed):
    model = _model(seed, **({"n_group": 2, "n_routed_experts": 6, "topk_group": 1} if seed == 2 else {}))
    cfg = model.config
    ids = _ids(cfg, seed, b=3, L=cfg.chunk_size + 9)
    full = model(ids)
    P = cfg.chunk_size + 2
    cache = model.new_cache()
    steps = [model(ids[:, :P], cache=cache)[:, -1]]
    for t in range(P, ids.shape[1]):  # the cached forward, one token at a time
        steps.append(model(ids[:, t:t + 1], cache=cache)[:, -1])
    assert (torch.stack(steps[:-1], 1) - full[:, P - 1:-1]).abs().max().item() <= TOL
    cache = model.new_cache()
    model(ids[:, :P], cache=cache)
    plan, state = model.step_plan(), StepState.from_cache(cache)
    out = []
    for t in range(P, ids.shape[1]):  # the engines' decode step
        state.reserve(t + 1)
        out.append(model.decode_step(ids[:, t], plan, state, length=t))
    assert (torch.stack(out, 1) - full[:, P:]).abs().max().item() <= TOL


def _budget(cfg, experts: int, expert_ffn: int, shared_ffn: int, hidden: int | None = None) -> Subnet:
    full = full_subnet(cfg)
    layers = tuple(LayerWidths(experts=experts, expert_ffn=expert_ffn, shared_ffn=shared_ffn)
                   if t == "moe" else w for t, w in zip(cfg.layers_block_type, full.layers))
    return Subnet(hidden or cfg.hidden_size, layers)


@pytest.mark.parametrize("case", ["one_group", "two_groups_rank_major", "top_k_capped"])
@torch.no_grad()
def test_a_budget_keeping_k_experts_equals_the_sliced_model_in_transformers(tmp_path, case):
    if case == "two_groups_rank_major":  # an expert prefix per group needs rank-major experts
        model = _model(7, n_routed_experts=10, num_experts_per_tok=3, n_group=2, topk_group=1,
                       head_order="rank_major", moe_latent_size=20)
        budget = _budget(model.config, 6, 7, 9, hidden=model.config.hidden_size - 8)
    elif case == "top_k_capped":
        model = _model(8, n_routed_experts=7, num_experts_per_tok=3, n_group=1, topk_group=1)
        budget = _budget(model.config, 2, 5, 12)
    else:
        model = _model(9, n_routed_experts=9, num_experts_per_tok=2, n_group=1, topk_group=1)
        budget = _budget(model.config, 4, 9, 6)
    cfg = model.config
    ids = _ids(cfg, 1)
    elastic = model(ids, subnet=budget)
    assert (elastic - model(ids)).abs().max().item() > 1e-3  # the budget is a different function
    sliced = slice_budget(model, budget)
    e = next(w.experts for t, w in zip(cfg.layers_block_type, budget.layers) if t == "moe")
    assert sliced.config.n_routed_experts == e and sliced.config.num_experts_per_tok == moe_top_k(cfg, e)
    assert (sliced(ids) - elastic).abs().max().item() <= TOL
    sliced.save_pretrained(tmp_path / "slice")
    assert (hf_model(tmp_path / "slice")(ids).logits - elastic).abs().max().item() <= TOL


@torch.no_grad()
def test_heterogeneous_expert_counts_slice_compact_and_refuse_padding(tmp_path):
    model = _model(4, n_routed_experts=8, num_experts_per_tok=2, n_group=1)
    cfg = model.config
    moe = [i for i, t in enumerate(cfg.layers_block_type) if t == "moe"]
    layers = list(full_subnet(cfg).layers)
    layers[moe[0]] = LayerWidths(experts=3, expert_ffn=cfg.moe_intermediate_size - 3, shared_ffn=5)
    budget = Subnet(cfg.hidden_size, tuple(layers))
    ids = _ids(cfg, 4)
    compact = slice_budget(model, budget)
    assert compact.config.layer_widths is not None
    compact.save_pretrained(tmp_path / "c")
    assert (ee.load(tmp_path / "c")(ids) - model(ids, subnet=budget)).abs().max().item() <= TOL
    with pytest.raises(BudgetError, match="routed experts"):
        slice_budget(model, budget, layout="padded")
    # expert widths alone pad exactly: a plain config transformers loads
    layers[moe[0]] = LayerWidths(experts=8, expert_ffn=cfg.moe_intermediate_size - 3, shared_ffn=5)
    budget = Subnet(cfg.hidden_size, tuple(layers))
    slice_budget(model, budget, layout="padded").save_pretrained(tmp_path / "p")
    assert (hf_model(tmp_path / "p")(ids).logits - model(ids, subnet=budget)).abs().max().item() <= TOL


@torch.no_grad()
def test_stacked_and_sharded_experts_load_in_both(tmp_path):
    model = _model(5)
    ids = _ids(model.config, 5)
    want = model(ids)
    model.save_pretrained(tmp_path / "stacked", max_shard_bytes=20_000)
    from elastic_export.hf_io import save_pretrained

    save_pretrained(model, tmp_path / "stacked", max_shard_bytes=20_000, expert_layout="stacked")
    assert (tmp_path / "stacked" / "model.safetensors.index.json").is_file()
    keys = json.loads((tmp_path / "stacked" / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(k.endswith("mixer.experts.up_proj") for k in keys)
    assert (ee.load(tmp_path / "stacked")(ids) - want).abs().max().item() <= TOL
    assert (hf_model(tmp_path / "stacked")(ids).logits - want).abs().max().item() <= TOL
    model.save_pretrained(tmp_path / "per_expert")
    with safe_open(tmp_path / "per_expert" / "model.safetensors", "pt") as f:
        names = list(f.keys())
        tensors = {k: f.get_tensor(k) for k in names}
    assert any(".experts.0.up_proj.weight" in k for k in names)
    gone = next(k for k in names if ".experts.1.down_proj.weight" in k)
    from safetensors.torch import save_file

    save_file({k: v for k, v in tensors.items() if k != gone}, str(tmp_path / "per_expert" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"experts\.1\.down_proj\.weight is missing"):
        ee.load(tmp_path / "per_expert")


@torch.no_grad()
def test_routers_stay_float32(tmp_path):
    model = _model(6).to(torch.bfloat16)
    i = model.config.layers_block_type.index("moe")
    gate = model.backbone.layers[i].mixer.gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert model.backbone.layers[i].mixer.experts.up_proj.dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "bf16")
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert f.get_slice(f"backbone.layers.{i}.mixer.gate.weight").get_dtype() == "F32"
        assert f.get_slice("backbone.embeddings.weight").get_dtype() == "BF16"
    loaded = ee.load(tmp_path / "bf16", dtype="bfloat16")
    assert loaded.backbone.layers[i].mixer.gate.weight.dtype == torch.float32
    ids = _ids(model.config, 6, L=9)
    assert (loaded(ids) - model(ids)).abs().max().item() == 0.0


def test_nested_checkpoint_carries_the_moe_widths(tmp_path):
    from elastic_export.nested import FORMAT_VERSION, load_nested, read_manifest, save_nested

    model = _model(2, n_routed_experts=8, num_experts_per_tok=2, n_group=1)
    budget = _budget(model.config, 4, 7, 10)
    save_nested(tmp_path / "n", model, {"half": budget})
    mf, cfg, budgets = read_manifest(tmp_path / "n")
    assert mf["format_version"] == 2 and FORMAT_VERSION >= 2  # 3: quantized checkpoints only (qcheckpoint)
    assert budgets["half"] == budget and cfg.n_routed_experts == 8
    layer = next(w for w in mf["budgets"][-1]["layers"] if w["type"] == "moe")
    assert (layer["experts"], layer["expert_ffn"], layer["shared_ffn"]) == (4, 7, 10)
    ck = load_nested(tmp_path / "n")
    ids = _ids(cfg, 2, L=11)
    with torch.no_grad():
        assert torch.equal(ck.model(ids, subnet=budget), model(ids, subnet=budget))
