"""Every command on a bf16 checkpoint as stored (real NVIDIA checkpoints are bf16), without a dtype
option: rank, nest, slice, build, run, validate and train (elastify). bf16 stays bf16; scores and the
SSM state are float32; results agree with the fp32 path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from elastic_export.cli import main
from elastic_export.hf_io import load
from elastic_export.importance import compute_importance
from elastic_export.nested import load_nested
from elastic_export.sorting import permutations
from helpers import random_model
from train_helpers import tiny_recipe, to_toml

BF16 = torch.bfloat16


def _run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


def _stored_dtypes(path):
    out = set()
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            out |= {sf.get_slice(k).get_dtype() for k in sf.keys()}
    return out


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    d = tmp_path_factory.mktemp("bf16")
    model = random_model(6, dtype=BF16, vocab_size=263)  # odd sizes, Mamba + attention + MLP layers
    assert set(model.config.layers_block_type) == {"linear_attention", "full_attention", "mlp"}
    model.save_pretrained(d / "parent")
    assert _stored_dtypes(d / "parent") == {"BF16"}
    np.save(d / "calib.npy", np.random.default_rng(0).integers(0, 263, 16 * 12))
    return d


def test_every_command_runs_on_a_bf16_parent(parent, tmp_path):
    d = parent
    _run("rank", d / "parent", "--calib", d / "calib.npy", "--out", tmp_path / "ranked", "--seq-len", 16,
         "--samples", 12, "--batch-size", 4)
    _run("nest", tmp_path / "ranked", "--budget", "75%", "--budget", "50%", "--out", tmp_path / "nested")
    for ck in ("ranked", "nested"):
        assert load_nested(tmp_path / ck).model.dtype == BF16 and _stored_dtypes(tmp_path / ck) >= {"BF16"}
    _run("slice", tmp_path / "nested", "--budget", "all", "--out", tmp_path / "sl")
    assert json.loads((tmp_path / "sl" / "75pct" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _run("build", tmp_path / "nested", "--target", "onnx", "--out", tmp_path / "build")
    for path in ("nested", "build"):
        out = _run("run", tmp_path / path, "--budget", "50pct", "--prompt", "ab", "--max-new-tokens", 4)
        assert out.startswith("ab")
    out = _run("run", tmp_path / "nested", "--dtype", "float32", "--prompt", "ab", "--max-new-tokens", 2)
    r = CliRunner().invoke(main, ["run", str(tmp_path / "build"), "--dtype", "bf16", "--prompt", "ab"])
    assert r.exit_code == 2 and "--dtype" in r.output and "Traceback" not in r.output
    _run("validate", tmp_path / "nested", "--report", tmp_path / "report", "--backends", "torch,torch-engine,sliced",
         "--no-memory", "--tasks", 2, "--greedy-tokens", 4, "--quiet")

    r = tiny_recipe(tmp_path, **{"model.init": str(d / "parent"),
                                 "stages": [{**tiny_recipe(tmp_path)["stages"][1], "tokens": 2 * 4 * 32}]})
    del r["model"]["config"]
    (tmp_path / "r.toml").write_text(to_toml(r))
    _run("train", tmp_path / "r.toml", "--out", tmp_path / "run", "--no-progress")
    trained = load_nested(tmp_path / "run" / "nested")
    assert trained.model.dtype == BF16 and len(trained.budgets) == 3  # saved as the parent is stored


def _same_order_up_to_ties(p_b, p_f, scores, rtol=0.03):
    """At every rank the two permutations pick the same item, or items whose (fp32) scores tie."""
    s = scores.double()
    tie = (s[p_b] - s[p_f]).abs() <= rtol * s.abs().max()
    return bool(((p_b == p_f) | tie).all()) and (p_b == p_f).float().mean() >= 0.8


@torch.no_grad()
def test_bf16_rank_orders_equal_fp32_up_to_ties(parent):
    b16 = load(parent / "parent")
    f32 = load(parent / "parent", dtype=torch.float32)
    assert b16.dtype == BF16
    ids = torch.from_numpy(np.load(parent / "calib.npy")).view(12, 16)
    ib, i_f = compute_importance(b16, ids, 4), compute_importance(f32, ids, 4)
    assert ib.hidden.dtype == torch.float64  # accumulated in high precision whatever the weights
    pb, pf = permutations(b16.config, ib), permutations(f32.config, i_f)
    assert _same_order_up_to_ties(pb.hidden, pf.hidden, i_f.hidden)
    for lb, lf, sf in zip(pb.layers, pf.layers, i_f.layers):
        for axis in lb:
            assert _same_order_up_to_ties(lb[axis], lf[axis], sf[axis]), axis
    assert _same_order_up_to_ties(torch.tensor(ib.depth_order), torch.tensor(i_f.depth_order), i_f.depth)


@torch.no_grad()
def test_bf16_torch_engine_close_to_the_fp32_model(parent):
    from elastic_export.elastic import full_subnet
    from engines.torch_engine import TorchEngine

    b16 = load(parent / "parent")
    f32 = load(parent / "parent", dtype=torch.float32).eval()
    sub = full_subnet(b16.config)
    ids = torch.from_numpy(np.load(parent / "calib.npy"))[:20].view(2, 10)
    ref = f32(ids, subnet=sub)  # the fp32 model's logits over the whole sequence
    eng = TorchEngine(b16, {"full": sub})
    got = [eng.prefill(ids[:, :6], last_only=True)] + [eng.decode(ids[:, t]) for t in range(6, 9)]
    got = torch.stack(got, dim=1)
    assert got.dtype == torch.float32
    assert {t.dtype for t in eng.state.ssm if t is not None} == {torch.float32}  # the SSM state, always
    assert {t.dtype for t in eng.state.conv + eng.state.k if t is not None} == {BF16}  # the rest as stored
    err = (got - ref[:, 5:9]).abs().max().item()
    assert err <= 0.05 * ref.abs().max().item(), err
    assert (got.argmax(-1) == ref[:, 5:9].argmax(-1)).float().mean() >= 0.75
