"""MoE layers as elastic axes: REAP expert importance against a float64 brute force, sorting that
preserves the function (n_group 1 and 2), budgets keeping k experts against the sliced model (ours
and transformers'), the budget search on total and active parameters (the Nemotron 3 Nano 30B plan),
the router's cost over the MoE axes, and `elastic-export train` end to end on a tiny MoE parent."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

import elastic_export as ee
from elastic_export.accounting import count_active_params, count_params
from elastic_export.cli import main
from elastic_export.elastic import LayerWidths, Subnet, full_subnet, group_members, moe_top_k
from elastic_export.importance import compute_importance
from elastic_export.model import build_model
from elastic_export.slicing import slice_budget
from elastic_export.sorting import sort_model
from helpers import hf_model, randomize, tiny_moe_config
from training.router import Router, budget_loss, gumbel_schedule
from training.space import ElasticSpace

GROUPS = {  # routing corners: one group; two groups, one chosen; two groups, both chosen, latent
    "one_group": dict(n_routed_experts=7, num_experts_per_tok=2, n_group=1, topk_group=1, moe_latent_size=None),
    "two_groups": dict(n_routed_experts=10, num_experts_per_tok=2, n_group=2, topk_group=1, moe_latent_size=None),
    "two_groups_latent": dict(n_routed_experts=8, num_experts_per_tok=3, n_group=2, topk_group=2, moe_latent_size=20,
                              norm_topk_prob=False, routed_scaling_factor=2.5),
}


def _model(seed: int, **overrides):
    return randomize(build_model(tiny_moe_config(seed, **overrides), seed=seed), seed).eval()


def _ids(cfg, seed: int, b: int = 3, L: int = 23):
    return torch.randint(0, cfg.vocab_size, (b, L), generator=torch.Generator().manual_seed(seed))


# ---- REAP against a brute force -------------------------------------------------------------------

def _brute_force(m, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token by token, expert by expert, float64: the router's choice written out (sigmoid scores,
    score bias for the choice, groups ranked by their two best, top-k), REAP sums, neuron sums."""
    W, bias = m.gate.weight.double(), m.gate.e_score_correction_bias.double()
    up, down = m.experts.up_proj.double(), m.experts.down_proj.double()  # [E, F, din], [E, din, F]
    E, F_ = up.shape[:2]
    G = m.n_group
    members = group_members(E, G, m.head_order)
    k = m.num_experts_per_tok
    reap, count, neurons = [0.0] * E, [0] * E, torch.zeros(E, F_, dtype=torch.float64)
    shared = torch.zeros(m.shared_experts.up_proj.weight.shape[0], dtype=torch.float64)
    for xt in x.double():
        scores = [1 / (1 + math.exp(-float(W[j] @ xt))) for j in range(E)]
        choice = [scores[j] + float(bias[j]) for j in range(E)]
        allowed = list(range(E))
        if G > 1 and m.topk_group < G:
            rank = sorted(range(G), key=lambda g: -sum(sorted((choice[j] for j in members[g]), reverse=True)[:2]))
            allowed = [j for g in rank[:m.topk_group] for j in members[g]]
        chosen = sorted(allowed, key=lambda j: -choice[j])[:k]
        w = [scores[j] for j in chosen]
        if m.norm_topk_prob:
            w = [v / (sum(w) + 1e-20) for v in w]
        u = xt
        if m.fc1_latent_proj is not None:
            u = m.fc1_latent_proj.weight.double() @ xt
        for j, g in zip(chosen, w):
            a = up[j] @ u
            out = down[j] @ m.act(a)
            reap[j] += g * m.routed_scaling_factor * float(out.norm())
            count[j] += 1
            neurons[j] += a.abs()
        shared += (m.shared_experts.up_proj.weight.double() @ xt).abs()
    return {"experts": torch.tensor([r / max(c, 1) for r, c in zip(reap, count)], dtype=torch.float64),
            "expert_ffn": neurons, "shared_ffn": shared}


@pytest.mark.parametrize("case", list(GROUPS))
@torch.no_grad()
def test_reap_and_neuron_scores_equal_a_float64_brute_force(case):
    model = _model(4, **GROUPS[case])
    cfg = model.config
    ids = _ids(cfg, 4, b=2, L=19)
    inputs, hooks = {}, []
    for i, blk in enumerate(model.backbone.layers):
        if blk.block_type == "moe":
            hooks.append(blk.mixer.register_forward_pre_hook(
                lambda mod, args, i=i: inputs.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1]))))
    model(ids)
    for h in hooks:
        h.remove()
    imp = compute_importance(model, ids, batch_size=1, depth="none")  # two batches: sums across them
    for i, xs in inputs.items():
        want = _brute_force(model.backbone.layers[i].mixer, torch.cat(xs))
        assert (want["experts"] == 0).sum() < cfg.n_routed_experts - 1  # most experts are routed to
        for key, w in want.items():
            got = imp.layers[i][key]
            assert got.shape == w.shape and torch.allclose(got, w, rtol=1e-4, atol=1e-6), (case, i, key)


# ---- sorting ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case,seed", [(c, s) for s, c in enumerate(GROUPS)] + [("random", 7), ("random", 8)])
@torch.no_grad()
def test_sorting_by_reap_preserves_the_function(case, seed):
    model = _model(seed, **GROUPS.get(case, {}))
    cfg = model.config
    ids = _ids(cfg, seed)
    imp = compute_importance(model, ids, depth="none")
    sorted_model, s_imp = sort_model(model, imp)
    assert sorted_model.config.head_order == "rank_major"
    assert (sorted_model(ids) - model(ids)).abs().max().item() <= 1e-5
    for i, t in enumerate(cfg.layers_block_type):
        if t != "moe":
            continue
        e = s_imp.layers[i]["experts"]  # rank-major: position j*G + g holds the rank-j expert of group g
        per_group = e.view(-1, cfg.n_group)  # [E/G, G]
        assert (per_group[:-1] >= per_group[1:]).all()
        assert sorted(e.tolist()) == sorted(imp.layers[i]["experts"].tolist())
        f = s_imp.layers[i]["expert_ffn"]
        assert (f[:, :-1] >= f[:, 1:]).all() and (s_imp.layers[i]["shared_ffn"].diff() <= 0).all()
        # the same expert's neuron scores moved with it
        for new, old in enumerate(_expert_perm(imp.layers[i]["experts"], e)):
            assert sorted(f[new].tolist()) == sorted(imp.layers[i]["expert_ffn"][old].tolist())


def _expert_perm(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    return [int((before == v).nonzero()[0]) for v in after]


def _moe_budget(cfg, experts_per_group: int, expert_ffn: int, shared_ffn: int, hidden: int | None = None) -> Subnet:
    layers = [LayerWidths(experts=experts_per_group * cfg.n_group, expert_ffn=expert_ffn, shared_ffn=shared_ffn)
              if t == "moe" else w for t, w in zip(cfg.layers_block_type, full_subnet(cfg).layers)]
    return Subnet(hidden or cfg.hidden_size, tuple(layers))


@pytest.mark.parametrize("case", ["one_group", "two_groups"])
@torch.no_grad()
def test_a_sorted_budget_keeping_k_experts_equals_the_sliced_model_here_and_in_transformers(tmp_path, case):
    model = _model(5, **GROUPS[case])
    ids = _ids(model.config, 5)
    model, imp = sort_model(model, compute_importance(model, ids, depth="none"))
    cfg = model.config
    sub = _moe_budget(cfg, 3, cfg.moe_intermediate_size - 5, cfg.moe_shared_expert_intermediate_size - 4,
                      cfg.hidden_size - 8)
    want = model(ids, subnet=sub)
    sliced = slice_budget(model, sub)
    assert sliced.config.n_routed_experts == 3 * cfg.n_group
    assert sliced.config.num_experts_per_tok == moe_top_k(cfg, 3 * cfg.n_group)
    assert (sliced(ids) - want).abs().max().item() <= 1e-5
    sliced.save_pretrained(tmp_path / "s")
    assert (hf_model(tmp_path / "s")(ids).logits - want).abs().max().item() <= 1e-4
    # the kept experts are the top REAP experts of every group
    i = cfg.layers_block_type.index("moe")
    e = imp.layers[i]["experts"].view(-1, cfg.n_group)
    assert (e[:3].min(0).values >= e[3:].max(0).values).all()


# ---- the budget search -----------------------------------------------------------------------------

def _plan_lines(out: str) -> dict[str, str]:
    return {line.split()[0]: line for line in out.split("budgets:")[1].split("\n\n")[0].strip().splitlines()}


def test_plan_nemotron_3_nano_at_23b_and_12b_is_close_to_star_elastic():
    """Star Elastic (Nemotron-Labs-3-Elastic-30B-A3B): nested 23B / 2.8B active and 12B / 2.0B active."""
    from elastic_export.search import plan_budgets

    cfg = ee.config.preset("nemotron-3-nano-30b-a3b")
    plans = plan_budgets(cfg, ["23B", "12B"])
    sizes = {n: (count_params(cfg, s) / 1e9, count_active_params(cfg, s) / 1e9) for n, s in plans.items()}
    assert 22.0 < sizes["23B"][0] <= 23.0 and 11.5 < sizes["12B"][0] <= 12.0, sizes
    assert 2.5 < sizes["23B"][1] < 3.3 and 1.8 < sizes["12B"][1] < 2.2, sizes  # Star Elastic: 2.8B, 2.0B
    assert sizes["full"][1] > sizes["23B"][1] > sizes["12B"][1]
    for n in ("23B", "12B"):
        moe = [w for t, w in zip(cfg.layers_block_type, plans[n].layers) if t == "moe"]
        assert all(w.experts < 128 and w.expert_ffn < 1856 for w in moe), n  # experts are an elastic axis
    out = CliRunner().invoke(main, ["plan", "--preset", "nemotron-3-nano-30b-a3b", "--budget", "23B",
                                    "--budget", "12B"])
    assert out.exit_code == 0, out.output
    lines = _plan_lines(out.output)
    for n in ("full", "23B", "12B"):
        assert f"active {sizes[n][1]:.2f}B" in lines[n].replace("  ", " ").replace("active  ", "active "), lines[n]


def test_plan_with_an_active_bound_keeps_both_bounds():
    from elastic_export.search import parse_budget, plan_budgets

    cfg = ee.config.preset("nemotron-3-nano-30b-a3b")
    plans = plan_budgets(cfg, ["23B/2.8B", "only=100%/2.5B"])
    s = plans["23B-A2.8B"]
    assert count_params(cfg, s) <= 23e9 and count_active_params(cfg, s) <= 2.8e9
    assert count_active_params(cfg, s) > 2.6e9  # grown back to the bound
    assert count_active_params(cfg, plans["only"]) <= 2.5e9
    from elastic_export.errors import BudgetError

    with pytest.raises(BudgetError, match="no MoE layers"):
        parse_budget("50%/40%", ee.config.preset("nemotron-nano-v2-12b"))


@torch.no_grad()
def test_a_planned_budget_of_a_tiny_moe_runs_as_its_slice():
    from elastic_export.search import plan_budgets

    model = _model(6, **GROUPS["two_groups"])
    ids = _ids(model.config, 6)
    model, imp = sort_model(model, compute_importance(model, ids, depth="none"))
    cfg = model.config
    plans = plan_budgets(cfg, ["60%", "80%/70%"], importance=imp, depth=False)
    full_a = count_active_params(cfg)
    assert count_params(cfg, plans["60pct"]) <= 0.6 * count_params(cfg)
    assert count_active_params(cfg, plans["80pct-A70pct"]) <= 0.7 * full_a
    for s in plans.values():
        assert (slice_budget(model, s)(ids) - model(ids, subnet=s)).abs().max().item() <= 1e-5


# ---- the router over the MoE axes ------------------------------------------------------------------

def _space(seed=0, **kw):
    cfg = tiny_moe_config(seed, head_order="rank_major", **kw)
    return cfg, ElasticSpace(cfg, (0.25, 0.5, 0.75, 1.0), max_dropped_layers=1)


@pytest.mark.parametrize("case", list(GROUPS))
def test_the_router_cost_counts_moe_axes_as_accounting_does(case):
    cfg, space = _space(3, **GROUPS[case])
    n_moe = cfg.layers_block_type.count("moe")
    assert all(space.axes[a].rows == n_moe for a in ("experts", "expert_ffn", "shared_ffn"))
    assert min(min(r) for r in space.axes["experts"].values) >= 2 * cfg.n_group
    assert all(v % cfg.n_group == 0 for r in space.axes["experts"].values for v in r)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        idx = {n: torch.randint(0, ax.choices, (ax.rows,), generator=g) for n, ax in space.axes.items()}
        sub = space.subnet(idx)
        ee.elastic.validate_subnet(cfg, sub)
        y = {k: torch.nn.functional.one_hot(v, space.axes[k].choices).float() for k, v in idx.items()}
        for metric, exact in (("params", count_params), ("active", count_active_params)):
            assert space.subnet_cost(sub, metric) == exact(cfg, sub)
            assert abs(float(space.cost(space.soft_widths(y), metric)) - exact(cfg, sub)) < 1e-3
    assert count_params(cfg) > count_active_params(cfg)


@pytest.mark.parametrize("metric", ["params", "active"])
def test_router_training_on_a_tiny_moe_lands_in_band_and_the_repair_keeps_it_nested(metric):
    cfg, space = _space(5, **GROUPS["two_groups"])
    full = space.subnet_cost(full_subnet(cfg), metric)
    torch.manual_seed(0)
    router = Router(space, 2, hidden=32)
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for step in range(100):
        tau, scale = gumbel_schedule(step / 99)
        router.sample(1, tau, scale, gen)
        loss = budget_loss(space.cost(space.expected_widths(router.probabilities(1)), metric), 0.6 * full, 0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        expected = float(space.cost(space.expected_widths(router.probabilities(1)), metric)) / full
    assert abs(expected / 0.6 - 1) <= 0.05 + 1e-6, expected
    upper = space.extreme_index(True)
    for frac in (0.8, 0.6):
        idx, ok = space.repair({k: v.tolist() for k, v in router.argmax(1).items()}, frac * full, 0.05, metric,
                               upper=upper)
        assert ok and abs(space.subnet_cost(space.subnet(idx), metric) / (frac * full) - 1) <= 0.05
        for a, b in zip(space.subnet(idx).layers, space.subnet(upper).layers):
            assert all(getattr(a, f) <= getattr(b, f) for f in ("experts", "expert_ffn", "shared_ffn")
                       if getattr(a, f) is not None)
        upper = idx


@torch.no_grad()
def test_straight_through_gates_over_moe_axes_leave_the_forward_unchanged():
    cfg, space = _space(2, **GROUPS["two_groups"])
    model = randomize(build_model(cfg), 2)
    router = Router(space, 3, hidden=16)
    with torch.enable_grad():
        y, idx = router.sample(2, 1.0, 1.0, torch.Generator().manual_seed(3))
        sub = space.subnet(idx)
        x = _ids(cfg, 2, 2, 12)
        gated = model(x, subnet=sub, gates=space.gates(y, idx))
        assert torch.equal(gated, model(x, subnet=sub))
        gated.square().mean().backward()
    grads = router.axes["experts"].net[0].weight.grad
    assert grads is not None and float(grads.abs().sum()) > 0


# ---- train end to end ------------------------------------------------------------------------------

MOE_PARENT = {"model.config.pattern": "ME*E-", "model.config.n_routed_experts": 8,
              "model.config.num_experts_per_tok": 2, "model.config.moe_intermediate_size": 24,
              "model.config.moe_shared_expert_intermediate_size": 40, "model.config.n_group": 2,
              "model.config.topk_group": 1}


@pytest.mark.parametrize("metric", ["params", "active"])
def test_train_elastifies_a_tiny_moe_parent_end_to_end(tmp_path, metric):
    from elastic_export.nested import load_nested
    from train_helpers import tiny_recipe, to_toml

    recipe = tmp_path / "r.toml"
    recipe.write_text(to_toml(tiny_recipe(tmp_path, **MOE_PARENT, **{
        "router.budget_metric": metric, "router.nested": True, "router.embedding_multiple": 4,
        "router.width_choices": [0.5, 0.625, 0.75, 0.875, 1.0],
        "router.axes": ["embedding", "experts", "expert_ffn", "shared_ffn", "mamba_heads", "ffn"],
        "budgets.names": ["full", "80pct", "60pct"], "budgets.fractions": [1.0, 0.8, 0.6]})))
    out = CliRunner().invoke(main, ["train", str(recipe), "--no-progress"])
    assert out.exit_code == 0, out.output
    nested = tmp_path / "run" / "nested"
    ck = load_nested(nested)
    cfg = ck.config
    assert cfg.has_moe and cfg.head_order == "rank_major"
    exact = count_params if metric == "params" else count_active_params
    final = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "budgets_final" in l][0]["budgets"]
    assert all(v["in_band"] for v in final.values()), final
    subs = ck.budgets
    for name, frac in (("80pct", 0.8), ("60pct", 0.6)):
        assert abs(exact(cfg, subs[name]) / (frac * exact(cfg)) - 1) <= 0.05 + 1e-9
    for a, b in zip(subs["60pct"].layers, subs["80pct"].layers):  # nested
        assert a.kept <= b.kept and all(getattr(a, f) <= getattr(b, f) for f in ("experts", "expert_ffn", "shared_ffn")
                                        if getattr(a, f) is not None)
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, sub in subs.items():
            assert (slice_budget(ck.model, sub)(ids) - ck.model(ids, subnet=sub)).abs().max().item() <= 1e-5
    if metric != "params":
        return
    # the chain on it: ONNX build, run from the build, validate (torch, sliced, torch engine, ONNX Runtime)
    build, report = tmp_path / "build", tmp_path / "report"
    out = CliRunner().invoke(main, ["build", str(nested), "--target", "onnx", "--out", str(build)])
    assert out.exit_code == 0, out.output
    out = CliRunner().invoke(main, ["run", str(build), "--budget", "60pct", "--prompt", "def add", "--max-new-tokens", "4"])
    assert out.exit_code == 0 and "[60pct] 4 tokens" in out.output, out.output
    out = CliRunner().invoke(main, ["validate", str(build), "--report", str(report), "--tasks", "2",
                                    "--greedy-tokens", "3", "--no-memory", "--quiet"])
    assert out.exit_code == 0 and "PASSED" in out.output, out.output
    rows = [l for l in out.output.splitlines() if l.startswith("ort-standard")]
    assert len(rows) == 3 and all(l.endswith("pass") for l in rows), out.output
    # the report covers the MoE family: active parameters and experts kept / per token, as accounted
    rep = json.loads((report / "report.json").read_text())["source"]["budgets"]
    for name, sub in subs.items():
        experts = [w.experts for t, w in zip(cfg.layers_block_type, sub.layers) if t == "moe" and w.kept]
        assert rep[name]["active_params"] == count_active_params(cfg, sub) < rep[name]["params"]
        assert rep[name]["experts"] == experts
        assert rep[name]["experts_per_token"] == [moe_top_k(cfg, e) for e in experts]
    assert "| active | routed experts kept (per token) |" in (report / "report.md").read_text()


@torch.no_grad()
def test_rank_and_nest_a_moe_checkpoint_on_the_command_line(tmp_path):
    from elastic_export.nested import load_nested

    model = _model(9, **GROUPS["two_groups"])
    model.save_pretrained(tmp_path / "parent")
    (tmp_path / "calib.txt").write_text(" ".join(str(i % model.config.vocab_size) for i in range(7, 7 + 400)))
    out = CliRunner().invoke(main, ["rank", str(tmp_path / "parent"), "--calib", str(tmp_path / "calib.txt"),
                                    "--out", str(tmp_path / "sorted"), "--seq-len", "20", "--depth", "none"])
    assert out.exit_code == 0, out.output
    out = CliRunner().invoke(main, ["nest", str(tmp_path / "sorted"), "--budget", "70%", "--budget", "90%/75%",
                                    "--out", str(tmp_path / "nested")])
    assert out.exit_code == 0, out.output
    ck = load_nested(tmp_path / "nested")
    ids = _ids(model.config, 9)
    assert (ck.model(ids) - model(ids)).abs().max().item() <= 1e-5  # sorted, function preserved
    assert count_active_params(ck.config, ck.budgets["90pct-A75pct"]) <= 0.75 * count_active_params(ck.config)
    assert any(w.experts is not None and w.experts < ck.config.n_routed_experts
               for s in ck.budgets.values() for w in s.layers)
    for s in ck.budgets.values():
        assert (slice_budget(ck.model, s)(ids) - ck.model(ids, subnet=s)).abs().max().item() <= 1e-5
