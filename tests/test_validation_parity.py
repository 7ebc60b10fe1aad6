"""Accuracy parity: correct backends pass; deliberately broken artefacts fail validation."""

from __future__ import annotations

import copy

import pytest
import torch

from elastic_export import slicing
from elastic_export.errors import ConfigError
from elastic_export.tokenizer import ByteTokenizer
from val_helpers import EVAL, one_thread, small_family  # noqa: F401 (fixture)
from validation.backends import Family, Sliced, TorchElastic, reference
from validation.parity import greedy_agreement, make_eval_data, run_parity
from validation.thresholds import THRESHOLDS, check, parse_overrides, thresholds


@pytest.fixture(scope="module")
def family():
    model, budgets = small_family()
    fam = Family(model, budgets, ByteTokenizer())
    data = make_eval_data(fam.tokenizer, model.config.vocab_size, **EVAL)
    return fam, data


def _run(fam, data, backends, budgets=None, with_tasks=False):
    return run_parity(reference(fam), backends, data, thresholds(), budgets, with_tasks=with_tasks, progress=False)


def test_torch_and_sliced_pass(family):
    fam, data = family
    res = _run(fam, data, [TorchElastic(fam.model, fam.budgets), Sliced(fam.model, fam.budgets)])
    assert len(res["rows"]) == 2 * len(fam.budgets)
    for r in res["rows"]:
        assert r["passed"], r
        assert r["metrics"]["abs_logit"] < 1e-4 and r["metrics"]["top1"] == 1.0 and r["metrics"]["greedy"] == 1.0
    assert set(res["reference"]) == set(fam.budgets)


def test_task_accuracy_through_backend_generate(family):
    fam, data = family
    data = copy.copy(data)
    data.tasks = data.tasks[:2]
    res = _run(fam, data, [Sliced(fam.model, fam.budgets)], ["b50"], with_tasks=True)
    m = res["rows"][0]["metrics"]
    assert 0 <= m["task_acc"] <= 1 and m["task_delta"] == 0 and res["rows"][0]["passed"]


def test_bf16_backend_judged_by_bf16_thresholds(family):
    fam, data = family
    res = _run(fam, data, [TorchElastic(fam.model, fam.budgets, name="torch-bf16", dtype=torch.bfloat16)], ["full"])
    (row,) = res["rows"]
    assert row["precision"] == "bf16"
    assert 1e-4 < row["metrics"]["abs_logit"] < THRESHOLDS["bf16"]["max_abs_logit"]
    assert row["passed"], row
    assert check(row["metrics"], THRESHOLDS["fp32"])  # the same numbers would fail the fp32 thresholds


def test_perturbed_weight_fails(family):
    """One weight of the standalone artefact changed: every budget reads it (head 0, channel 0, column 0)."""
    fam, data = family

    def perturbed_slice(model, subnet):
        out = slicing.slice_budget(model, subnet)
        layer = next(b for b in out.backbone.layers if b.block_type == "linear_attention").mixer
        with torch.no_grad():
            layer.in_proj.weight[layer.num_heads * layer.head_dim, 0] += 1.0  # x part, first row
        return out

    res = _run(fam, data, [Sliced(fam.model, fam.budgets, perturbed_slice, name="perturbed")])
    assert all(not r["passed"] for r in res["rows"])
    assert all(any(f.startswith("abs_logit") for f in r["failed"]) for r in res["rows"])


def test_wrong_head_order_fails(family, monkeypatch):
    """A slicer that forgets to turn rank-major heads back into group-contiguous order."""
    fam, data = family
    monkeypatch.setattr(slicing, "_to_contiguous", lambda t, groups, order: t)
    res = _run(fam, data, [Sliced(fam.model, fam.budgets, name="misordered")], ["full", "b75"])
    assert all(not r["passed"] for r in res["rows"]), [r["failed"] for r in res["rows"]]
    # (b50 keeps one head per group: there, every order is the right one)


class StaleDecodeState(TorchElastic):
    """A decode step whose state output is dropped: every step starts again from the prefill's state."""

    def prefill(self, ids, attention_mask=None):
        out = super().prefill(ids, attention_mask)
        self.frozen = copy.deepcopy(self.cache)
        return out

    def decode(self, ids):
        self.cache = copy.deepcopy(self.frozen)
        return super().decode(ids)


def test_dropped_decode_state_fails(family):
    fam, data = family
    res = _run(fam, data, [StaleDecodeState(fam.model, fam.budgets, name="stale-state")])
    for r in res["rows"]:
        assert not r["passed"]
        assert r["metrics"]["prefill_max_abs"] < 1e-5  # prefill is right: only the decode check catches it
        assert r["metrics"]["decode_max_abs"] > 1e-3


def test_crashing_backend_fails_its_rows(family):
    fam, data = family

    class Broken(TorchElastic):
        def decode(self, ids):
            raise RuntimeError("state input past.2.ssm missing")

    res = _run(fam, data, [Broken(fam.model, fam.budgets, name="broken")], ["b50"])
    (row,) = res["rows"]
    assert not row["passed"] and "past.2.ssm" in row["failed"][0]


def test_greedy_agreement_counts_matching_prefix():
    ref = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    assert greedy_agreement(ref, ref) == 1.0
    assert greedy_agreement(torch.tensor([[1, 2, 9, 4], [0, 2, 3, 4]]), ref) == pytest.approx((2 / 4 + 0) / 2)


def test_threshold_overrides():
    o = parse_overrides(["fp32.max_abs_logit=1e-5", "min_top1=0.5", "bfloat16.min_greedy=0"])
    t = thresholds(o)
    assert t["fp32"]["max_abs_logit"] == 1e-5 and THRESHOLDS["fp32"]["max_abs_logit"] == 1e-3
    assert t["fp32"]["min_top1"] == t["bf16"]["min_top1"] == 0.5 and t["bf16"]["min_greedy"] == 0
    assert check({"abs_logit": 2e-5, "top1": 1.0}, t["fp32"]) == ["abs_logit 2e-05 > 1e-05"]
    for bad in ["max_abs_logit", "fp64.max_abs_logit=1", "fp32.nope=1", "fp32.min_top1=high"]:
        with pytest.raises(ConfigError):
            parse_overrides([bad])
