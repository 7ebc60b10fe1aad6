"""Router: shapes, overhead, Gumbel schedule, straight-through gradient, budget loss; the cost count."""

import torch

from elastic_export.elastic import full_subnet
from elastic_export.model import build_model
from helpers import randomize, tiny_config
from training.recipe import load_recipe, parent_config
from training.router import Router, budget_loss, gumbel_schedule, gumbel_softmax_st
from training.space import ElasticSpace


def rank_major(seed=0, **kw):
    return tiny_config(seed, head_order="rank_major", **kw)


def test_router_shapes_heterogeneous_and_homogeneous():
    cfg = rank_major(1)
    n = {t: cfg.layers_block_type.count(t) for t in set(cfg.layers_block_type)}
    space = ElasticSpace(cfg, (0.5, 0.75, 1.0), max_dropped_layers=2)
    logits = Router(space, 3, hidden=32).logits(1)
    assert logits["embedding"].shape == (1, 3)
    assert logits["mamba_heads"].shape == (n["linear_attention"], 3)
    assert logits["mamba_head_dim"].shape == (n["linear_attention"], 3)
    assert logits["attn_heads"].shape == (n["full_attention"], 3)
    assert logits["ffn"].shape == (n["mlp"], 3)
    assert logits["depth"].shape == (1, 3)  # drop 0, 1 or 2 layers
    homo = Router(ElasticSpace(cfg, (0.5, 0.75, 1.0), heterogeneous=False), 3, hidden=32).logits(0)
    assert all(v.shape[0] == 1 for v in homo.values())


def test_router_overhead_below_two_percent_of_default_model():
    r = load_recipe("training/recipes/default.toml")
    cfg = parent_config(r)
    from training.recipe import make_space

    router = Router(make_space(cfg, r), len(r["budgets"]["names"]), r["router"]["hidden"])
    model = build_model(cfg, device="meta")
    ratio = sum(p.numel() for p in router.parameters()) / model.num_parameters()
    assert ratio < 0.02, ratio


def test_gumbel_schedule_is_linear_from_1_to_005_and_1_to_10():
    assert gumbel_schedule(0.0) == (1.0, 1.0)
    tau, scale = gumbel_schedule(1.0)
    assert abs(tau - 0.05) < 1e-12 and abs(scale - 10.0) < 1e-12
    tau, scale = gumbel_schedule(0.5)
    assert abs(tau - 0.525) < 1e-12 and abs(scale - 5.5) < 1e-12
    assert gumbel_schedule(2.0) == gumbel_schedule(1.0)


def test_gumbel_st_is_one_hot_forward_with_soft_gradient():
    logits = torch.randn(4, 5, requires_grad=True)
    y, idx = gumbel_softmax_st(logits, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(y.detach(), torch.nn.functional.one_hot(idx, 5).float())
    (y * torch.arange(5.0)).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_straight_through_gates_leave_forward_unchanged_and_reach_router():
    cfg = rank_major(2)
    model = randomize(build_model(cfg), 2)
    space = ElasticSpace(cfg, (0.5, 0.75, 1.0), max_dropped_layers=1)
    router = Router(space, 3, hidden=16)
    y, idx = router.sample(2, tau=1.0, scale=1.0, generator=torch.Generator().manual_seed(3))
    sub = space.subnet(idx)
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    gated = model(x, subnet=sub, gates=space.gates(y, idx))
    plain = model(x, subnet=sub)
    assert torch.equal(gated, plain)
    gated.square().mean().backward()
    grads = [p.grad for p in router.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def _train_router(space, seed, cost_of, steps=150, target_frac=0.5):
    full = space.subnet_cost(full_subnet(space.cfg))
    torch.manual_seed(seed)
    router = Router(space, 2, hidden=32)
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        tau, scale = gumbel_schedule(step / (steps - 1))
        y, _ = router.sample(1, tau, scale, gen)
        loss = budget_loss(space.cost(cost_of(router, y)), target_frac * full, tolerance=0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return router, full


def test_expected_cost_budget_loss_reaches_the_band_and_keeps_a_gradient():
    cfg = rank_major(3)
    space = ElasticSpace(cfg, (0.25, 0.5, 0.75, 1.0), max_dropped_layers=1)
    for seed in range(2):
        router, full = _train_router(space, seed, lambda r, y: space.expected_widths(r.probabilities(1)), steps=100)
        with torch.no_grad():
            expected = float(space.cost(space.expected_widths(router.probabilities(1)))) / full
        assert abs(expected / 0.5 - 1) <= 0.05 + 1e-6, (seed, expected)
    # a router pushed far off target: at the end of the schedule (tau 0.05, scale 10) the sampled
    # straight-through cost has (almost) no gradient left; the expected cost still has one
    torch.manual_seed(0)
    router = Router(space, 2, hidden=32)
    with torch.no_grad():
        for ax in router.axes.values():
            ax.net[2].bias.copy_(torch.arange(ax.choices, dtype=torch.float32).repeat(ax.rows) * 3.0)
    full = space.subnet_cost(full_subnet(cfg))
    grads = {}
    for mode in ("sampled", "expected"):
        router.zero_grad()
        y, _ = router.sample(1, 0.05, 10.0, torch.Generator().manual_seed(0))
        w = space.soft_widths(y) if mode == "sampled" else space.expected_widths(router.probabilities(1))
        budget_loss(space.cost(w), 0.5 * full, 0.05).backward()
        grads[mode] = sum(float(p.grad.norm()) for p in router.parameters() if p.grad is not None)
    assert grads["expected"] > 1e-3 and grads["sampled"] < 1e-3 * grads["expected"], grads


def _random_index(space, gen):
    return {n: [int(torch.randint(0, ax.choices, (1,), generator=gen)) for _ in range(ax.rows)]
            for n, ax in space.axes.items()}


def test_repair_lands_in_band_nested_and_deterministic():
    from elastic_export.importance import compute_importance
    from elastic_export.sorting import sort_model
    from helpers import randomize

    cfg = rank_major(4)
    model = randomize(build_model(cfg, seed=4), 4)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    model, imp = sort_model(model, compute_importance(model, ids, depth="oneshot"))
    space = ElasticSpace(model.config, (0.5, 0.625, 0.75, 0.875, 1.0), max_dropped_layers=1,
                         depth_ranking=imp.depth_order)
    full = space.subnet_cost(full_subnet(model.config))
    gen = torch.Generator().manual_seed(0)
    for trial in range(4):
        upper = space.extreme_index(True)
        for frac in (0.75, 0.5):
            raw = _random_index(space, gen)
            idx, ok = space.repair(raw, frac * full, 0.05, imp=imp, upper=upper)
            cost = space.subnet_cost(space.subnet(idx))
            assert ok and abs(cost / (frac * full) - 1) <= 0.05, (trial, frac, cost / full)
            assert space.repair(raw, frac * full, 0.05, imp=imp, upper=upper) == (idx, ok)  # deterministic
            assert space.repair(idx, frac * full, 0.05, imp=imp, upper=upper)[0] == idx  # in band: unchanged
            big, small = space.subnet(upper), space.subnet(idx)  # nested: never wider than the larger budget
            assert small.hidden <= big.hidden
            for a, b in zip(small.layers, big.layers):
                assert a.kept <= b.kept
                for f in ("mamba_heads", "mamba_head_dim", "attn_heads", "ffn"):
                    if getattr(a, f) is not None:
                        assert getattr(a, f) <= getattr(b, f), (trial, f)
            upper = idx


def test_duplicate_width_choices_are_never_picked():
    cfg = rank_major(3)
    space = ElasticSpace(cfg, (0.25, 0.5, 0.75, 1.0), max_dropped_layers=1)
    dup = [(n, r, k) for n, ax in space.axes.items() for r, row in enumerate(ax.valid) for k, ok in enumerate(row)
           if not ok]
    assert dup, "the test config should round two choices to one width"
    for n, r, k in dup:
        assert space.axes[n].values[r][k] in space.axes[n].values[r][:k]
    router = Router(space, 2, hidden=32)
    for seed in range(20):
        _, index = router.sample(1, 1.0, 1.0, torch.Generator().manual_seed(seed))
        for n, r, k in dup:
            assert int(index[n][r]) != k
    for n, r, k in dup:
        assert float(router.probabilities(0)[n][r, k]) == 0.0


def test_parameter_count_matches_weight_views():
    for seed in range(4):
        cfg = rank_major(seed)
        model = build_model(cfg)
        space = ElasticSpace(cfg, (0.5, 0.75, 1.0), max_dropped_layers=1)
        assert space.subnet_cost(full_subnet(cfg)) == model.num_parameters()
        g = torch.Generator().manual_seed(seed)
        idx = {n: torch.randint(0, ax.choices, (ax.rows,), generator=g) for n, ax in space.axes.items()}
        sub = space.subnet(idx)
        _, views = model.layer_views(sub)
        n = model.backbone.embeddings.weight[:, :sub.hidden].numel() + sub.hidden
        if model.lm_head is not None:
            n += model.lm_head.weight[:, :sub.hidden].numel()
        for v in views:
            if v is None:
                continue
            n += sub.hidden  # the block's pre-norm
            for k, t in v._asdict().items():
                if k == "fused" or t is None:
                    continue
                n += sum(x.numel() for x in t) if isinstance(t, tuple) else t.numel()
        assert space.subnet_cost(sub) == n
        # differentiable widths from one-hots give the same count
        y = {k: torch.nn.functional.one_hot(v, space.axes[k].choices).float() for k, v in idx.items()}
        assert abs(float(space.cost(space.soft_widths(y))) - n) < 1e-3 * n


def test_memory_cost_counts_weights_and_states():
    cfg = rank_major(1)
    space = ElasticSpace(cfg, (0.5, 1.0))
    full = full_subnet(cfg)
    small = space.subnet(space.extreme_index(False))
    m_full, m_small = space.subnet_cost(full, "memory", 1024), space.subnet_cost(small, "memory", 1024)
    assert m_full > 2 * space.subnet_cost(full) and m_small < m_full
    n_attn = cfg.layers_block_type.count("full_attention")
    kv = n_attn * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    assert space.subnet_cost(full, "memory", 2048) - m_full == kv * 1024  # KV grows with the context
