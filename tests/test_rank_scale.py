"""Depth ranking at scale (issue 13 item 2): the hidden-state reuse of depth_scores equals the old
per-layer full forward (kept here as the reference) on random hybrids with Mamba, attention, MLP and
MoE layers, several batches, chunked logit comparison; `rank --device cuda` refuses clearly without
CUDA; `rank` reports its measured cost per token."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import elastic_export.importance as importance
from elastic_export.cli import main
from elastic_export.importance import _skip_subnet, depth_scores
from elastic_export.model import build_model
from core_helpers import calib_ids
from helpers import randomize, tiny_config, tiny_moe_config


@torch.no_grad()
def reference_depth_scores(model, batches, mode):
    """The pre-issue-13 implementation: one full forward per (layer, batch) with skip_layer=j."""
    cfg = model.config
    L = cfg.num_hidden_layers
    full = [model(ids).double() for ids in batches]
    den = sum(float(m.pow(2).sum()) for m in full) or 1.0

    def score(removed, j):
        sub = _skip_subnet(cfg, removed)
        return sum(float((m - model(ids, subnet=sub, skip_layer=j).double()).pow(2).sum())
                   for ids, m in zip(batches, full)) / den

    scores = torch.zeros(L, dtype=torch.float64)
    if mode == "oneshot":
        for j in range(L):
            scores[j] = score(set(), j)
        return scores, torch.argsort(scores, stable=True).tolist()
    removed = []
    while len(removed) < L:
        rest = [j for j in range(L) if j not in removed]
        cand = {j: score(set(removed), j) for j in rest}
        j = min(rest, key=lambda r: (cand[r], r))
        scores[j] = cand[j]
        removed.append(j)
    return scores, removed


def _model(kind, seed):
    cfg = (tiny_moe_config if kind == "moe" else tiny_config)(seed)
    return randomize(build_model(cfg, seed=seed), seed).eval()


@pytest.mark.parametrize("kind,seed,mode", [("hybrid", 4, "oneshot"), ("moe", 1, "oneshot"),
                                            ("moe", 2, "iterative"), ("hybrid", 5, "iterative")])
def test_reuse_equals_per_layer_full_forward(kind, seed, mode):
    m = _model(kind, seed)
    assert {"linear_attention", "full_attention", "mlp"} <= set(m.config.layers_block_type)
    ids = calib_ids(m.config, 5, 13, seed)
    batches = list(ids.split(2))  # 2 + 2 + 1 windows: sums accumulate across uneven batches
    got, order = depth_scores(m, batches, mode)
    ref, ref_order = reference_depth_scores(m, batches, mode)
    assert got.dtype == torch.float64 and (ref > 0).all()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    assert order == ref_order


def test_chunked_logit_comparison_equals_one_chunk(monkeypatch):
    """Comparing the logits a few positions at a time (the memory bound at 8k tokens) changes nothing."""
    m = _model("moe", 3)
    batches = list(calib_ids(m.config, 3, 11, 3).split(2))
    whole, order = depth_scores(m, batches)
    monkeypatch.setattr(importance, "_LOGIT_CHUNK", 2 * m.config.vocab_size * 3)  # 3 positions of 2 windows
    chunked, chunked_order = depth_scores(m, batches)
    torch.testing.assert_close(chunked, whole, rtol=1e-9, atol=0)
    assert chunked_order == order


@pytest.fixture(scope="module")
def parent_and_calib(tmp_path_factory):
    d = tmp_path_factory.mktemp("rankscale")
    randomize(build_model(tiny_config(6), seed=6), 6).save_pretrained(d / "parent")
    np.save(d / "calib.npy", np.random.RandomState(0).randint(0, 97, size=6 * 16))
    return d


def test_rank_device_cuda_refused_without_cuda(parent_and_calib, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    d = parent_and_calib
    r = CliRunner().invoke(main, ["rank", str(d / "parent"), "--calib", str(d / "calib.npy"), "--out",
                                  str(tmp_path / "r"), "--seq-len", "16", "--device", "cuda"])
    assert r.exit_code == 2 and "--device" in r.output and "CUDA" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "r").exists()


def test_rank_reports_cost_per_token(parent_and_calib, tmp_path):
    d = parent_and_calib
    r = CliRunner().invoke(main, ["rank", str(d / "parent"), "--calib", str(d / "calib.npy"), "--out",
                                  str(tmp_path / "r"), "--seq-len", "16", "--batch-size", "4"])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if "per calibration token" in x)
    per_token = float(line.split("s per calibration token")[0].split()[-1])
    total = float(next(x for x in r.output.splitlines() if "ranked on 6 x 16" in x).split(" in ")[1].split()[0])
    assert 0 < per_token and per_token * 6 * 16 == pytest.approx(total, rel=0.01, abs=0.051)  # total: 0.1 s steps
    assert "1024 x 8192" in line
