"""Engines: torch (views of the nested weights) and ONNX Runtime (one shared weight buffer)."""

from __future__ import annotations

import pytest
import torch

from elastic_export.build import build
from elastic_export.errors import BudgetError
from elastic_fixtures import family, save_nested_fixture
from engines.torch_engine import TorchEngine
from helpers import random_model

TOL = 1e-4


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("eng")
    model = random_model(7, head_order="rank_major", vocab_size=211).eval()
    budgets = family(model.config, 7, 3)
    save_nested_fixture(d / "nested", model, budgets)
    build(d / "nested", d / "build", target="onnx")
    build(d / "nested", d / "build_decomposed", target="onnx", ssm_op="decomposed")
    return model, budgets, d / "build"


@torch.no_grad()
def test_torch_engine_decode_equals_elastic_forward(built):
    model, budgets, _ = built
    eng = TorchEngine(model, budgets)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    for name, s in budgets.items():
        eng.set_budget(name)
        logits = eng.prefill(ids, mask)
        cache = model.new_cache()
        ref = model(ids, subnet=s, cache=cache, attention_mask=mask)
        torch.testing.assert_close(logits, ref, atol=TOL, rtol=0)
        for _ in range(40):  # past the first KV growth (capacity 64 - 11)... and a bit
            tok = torch.randint(0, model.config.vocab_size, (2,), generator=g)
            torch.testing.assert_close(eng.decode(tok), model(tok[:, None], subnet=s, cache=cache)[:, -1],
                                       atol=TOL, rtol=0)


def test_torch_engine_budgets_are_views_of_one_copy(built):
    model, budgets, _ = built
    eng = TorchEngine(model, budgets)
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for name in eng.budgets:
        eng.set_budget(name)
        for v in eng.views:
            for t in (v or ()):
                if isinstance(t, torch.Tensor):
                    assert t.untyped_storage().data_ptr() in storages  # a view, never a copy
    with pytest.raises(BudgetError, match="unknown budget"):
        eng.set_budget("nope")


@pytest.mark.parametrize("build_name", ["build", "build_decomposed"])
def test_generation_same_32_tokens_torch_and_ort(built, build_name):
    from engines.ort_engine import OrtEngine

    model, budgets, bdir = built
    te = TorchEngine(model, budgets)
    oe = OrtEngine(bdir.parent / build_name, threads=1)
    assert oe.budgets == te.budgets == list(budgets)
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    for name, s in budgets.items():
        te.set_budget(name)
        oe.set_budget(name)
        ref = model.generate(ids, 32, subnet=s)
        assert torch.equal(te.generate(ids, 32), ref), name
        assert torch.equal(oe.generate(ids, 32), ref), name


def test_ort_engine_shares_one_weight_buffer(built):
    """Every session's weights are views of the engine's one buffer (no per-budget copy)."""
    from engines.ort_engine import OrtEngine

    model, budgets, bdir = built
    oe = OrtEngine(bdir, threads=1)
    base, end = oe.buffer.ctypes.data, oe.buffer.ctypes.data + oe.buffer.nbytes
    assert oe._values and all(base <= v.data_ptr() < end for v in oe._values.values())
    # weights changed in the buffer are seen by the sessions: proof that nothing was copied
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    before = oe.prefill(ids).clone()
    oe.buffer[:] = 0
    assert not torch.equal(oe.prefill(ids), before)
