"""rank and nest, streamed (issue 13 items 1 and 2): the sorted weights written tensor by tensor equal
the in-memory path of before (its permute_state kept here as the reference); rank in bf16 (the
stored dtype) gives the fp32 scores to within bf16's resolution and, on a test model whose scores
are set apart by more than that, the same permutations: the same sorted checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import elastic_export as ee
from core_helpers import calib_ids
from elastic_export.cli import main
from elastic_export.hf_io import load
from elastic_export.importance import compute_importance, load_calibration
from elastic_export.nested import WEIGHTS, load_nested
from elastic_export.sorting import Permutations, _grid, permutations, permute_state
from helpers import randomize, random_model, tiny_moe_config

BF16 = torch.bfloat16


@torch.no_grad()
def old_permute_state(cfg, state, perms: Permutations):
    """permute_state before issue 13: the whole state dict, names rewritten in turn (the reference)."""
    s = dict(state)
    pi = perms.hidden

    def cols(name, idx):
        if name in s:
            s[name] = s[name][:, idx]

    def rows(name, idx):
        if name in s and s[name] is not None:
            s[name] = s[name][idx]

    def mlp(m, f):
        for name, dim, idx in ((m + "up_proj.weight", 0, f), (m + "up_proj.bias", 0, f), (m + "up_proj.weight", 1, pi),
                               (m + "down_proj.weight", 1, f), (m + "down_proj.weight", 0, pi),
                               (m + "down_proj.bias", 0, pi)):
            if name in s:
                s[name] = s[name].index_select(dim, idx)

    cols("backbone.embeddings.weight", pi)
    cols("lm_head.weight", pi)
    rows("backbone.norm_f.weight", pi)
    for i, (t, p) in enumerate(zip(cfg.layers_block_type, perms.layers)):
        pre = f"backbone.layers.{i}."
        m = pre + "mixer."
        rows(pre + "norm.weight", pi)
        if t == "linear_attention":
            H, P = cfg.layer_dims(i)["mamba_num_heads"], cfg.layer_dims(i)["mamba_head_dim"]
            I, GN = H * P, cfg.n_groups * cfg.ssm_state_size
            hp = _grid(p["heads"], p["channels"], P)
            idx = torch.cat([hp, I + hp, 2 * I + torch.arange(2 * GN), 2 * I + 2 * GN + p["heads"]])
            rows(m + "in_proj.weight", idx)
            rows(m + "in_proj.bias", idx)
            cols(m + "in_proj.weight", pi)
            conv = torch.cat([hp, I + torch.arange(2 * GN)])
            rows(m + "conv1d.weight", conv)
            rows(m + "conv1d.bias", conv)
            for name in ("dt_bias", "A_log", "D"):
                rows(m + name, p["heads"])
            rows(m + "norm.weight", hp)
            cols(m + "out_proj.weight", hp)
            rows(m + "out_proj.weight", pi)
            rows(m + "out_proj.bias", pi)
        elif t == "full_attention":
            hd = cfg.head_dim
            q = (p["heads"][:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)
            rows(m + "q_proj.weight", q)
            for name in ("q_proj", "k_proj", "v_proj"):
                cols(m + name + ".weight", pi)
            cols(m + "o_proj.weight", q)
            rows(m + "o_proj.weight", pi)
        elif t == "moe":
            pe = p["experts"]
            for name in ("gate.weight", "gate.e_score_correction_bias", "experts.up_proj", "experts.down_proj"):
                rows(m + name, pe)
            cols(m + "gate.weight", pi)
            nf = p["expert_ffn"][pe]
            up, down = s[m + "experts.up_proj"], s[m + "experts.down_proj"]
            s[m + "experts.up_proj"] = up.gather(1, nf[:, :, None].expand(up.shape))
            s[m + "experts.down_proj"] = down.gather(2, nf[:, None, :].expand(down.shape))
            if m + "fc1_latent_proj.weight" in s:
                cols(m + "fc1_latent_proj.weight", pi)
                rows(m + "fc2_latent_proj.weight", pi)
                rows(m + "fc2_latent_proj.bias", pi)
            else:
                s[m + "experts.up_proj"] = s[m + "experts.up_proj"][:, :, pi]
                s[m + "experts.down_proj"] = s[m + "experts.down_proj"][:, pi]
            mlp(m + "shared_experts.", p["shared_ffn"])
        else:
            mlp(m, p["ffn"])
    return {k: v.contiguous() for k, v in s.items()}


def _moe(seed, **overrides):
    return randomize(ee.build_model(tiny_moe_config(seed, **overrides), seed=seed), seed)


@pytest.mark.parametrize("kind,seed", [("dense", 0), ("dense", 1), ("moe", 2), ("moe", 3), ("latent", 4)])
def test_per_tensor_permutation_equals_the_dict_path(kind, seed):
    m = random_model(seed) if kind == "dense" else _moe(seed, moe_latent_size=20 if kind == "latent" else None)
    imp = compute_importance(m.eval(), calib_ids(m.config, 3, 11, seed), batch_size=2)
    perms = permutations(m.config, imp)
    new, old = permute_state(m.config, m.state_dict(), perms), old_permute_state(m.config, m.state_dict(), perms)
    assert new.keys() == old.keys()
    assert all(torch.equal(new[k], old[k]) for k in new)
    assert any(not torch.equal(new[k], v) for k, v in m.state_dict().items())  # something moved


def _run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.parametrize("kind,dtype,shard", [("dense", None, None), ("dense", BF16, 9_000), ("moe", BF16, 6_000),
                                              ("moe", None, None)])
def test_rank_and_nest_write_what_the_in_memory_path_wrote(tmp_path, kind, dtype, shard):
    m = (random_model(5) if kind == "dense" else _moe(5)).to(dtype or torch.float32)
    m.save_pretrained(tmp_path / "parent", max_shard_bytes=shard)  # MoE: per-expert tensors, read stacked
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).integers(0, m.config.vocab_size, 5 * 12))
    _run("rank", tmp_path / "parent", "--calib", tmp_path / "calib.npy", "--out", tmp_path / "ranked", "--seq-len", 12,
         "--batch-size", 2, "--no-progress")
    _run("nest", tmp_path / "ranked", "--budget", "75%", "--out", tmp_path / "nested")
    _run("nest", tmp_path / "ranked", "--budget", "75%", "--out", tmp_path / "nested32", "--dtype", "float32")
    # the reference: everything in memory, safetensors' own save_file
    parent = load(tmp_path / "parent")
    ids = load_calibration([tmp_path / "calib.npy"], m.config.vocab_size, 12, 64)
    imp = compute_importance(parent.eval(), ids, 2, "oneshot")
    ref = old_permute_state(parent.config, parent.state_dict(), permutations(parent.config, imp))
    save_file(ref, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    save_file({k: v.float() if v.is_floating_point() else v for k, v in ref.items()},
              str(tmp_path / "ref32.safetensors"), metadata={"format": "pt"})
    ref_bytes = (tmp_path / "ref.safetensors").read_bytes()
    assert (tmp_path / "ranked" / WEIGHTS).read_bytes() == ref_bytes
    assert (tmp_path / "nested" / WEIGHTS).read_bytes() == ref_bytes
    assert (tmp_path / "nested32" / WEIGHTS).read_bytes() == (tmp_path / "ref32.safetensors").read_bytes()
    assert len(load_nested(tmp_path / "nested").budgets) == 2


# ---- bf16 rank: the fp32 scores, the same permutations ---------------------------------------------

SEPARATED = dict(seed=51, hidden_size=16, intermediate_size=12, tie_word_embeddings=False)  # a test model whose
# fp32 scores lie further apart than bf16's score error on every axis (asserted below)


def _axes(imp, perms):
    yield "hidden", imp.hidden, perms.hidden
    for i, (s, p) in enumerate(zip(imp.layers, perms.layers)):
        for k in s:
            yield f"layer {i} {k}", s[k], p[k]
    yield "depth", imp.depth, torch.tensor(imp.depth_order)


def _separated_model():
    kw = dict(SEPARATED)
    return random_model(kw.pop("seed"), **kw).eval()


@torch.no_grad()
def test_bf16_rank_gives_the_fp32_scores_and_permutations():
    f32 = _separated_model()
    ids = calib_ids(f32.config, 16, 32, 51)
    i32 = compute_importance(f32, ids, 8)
    i16 = compute_importance(f32.to(BF16), ids, 8)  # bf16 weights as stored (exact in fp32 too): bf16 forward
    p32, p16 = permutations(f32.config, i32), permutations(f32.config, i16)
    for (name, s32, q32), (_, s16, q16) in zip(_axes(i32, p32), _axes(i16, p16)):
        s32, s16 = s32.double().flatten(), s16.double().flatten()
        err = ((s16 - s32).abs() / s32.abs()).max().item()
        assert s16.dtype == torch.float64 and err <= 0.01, (name, err)  # fp32+ accumulation: bf16 rounding only
        v = s32.sort().values
        gap = ((v[1:] - v[:-1]) / v[1:].abs()).min().item() if len(v) > 1 else 1.0
        assert gap > err, (name, gap, err)  # no tie at bf16's resolution on this model ...
        assert torch.equal(q16, q32), name  # ... so the same permutation


def test_rank_cli_in_bf16_writes_the_fp32_computed_checkpoint(tmp_path):
    _separated_model().to(BF16).save_pretrained(tmp_path / "parent")
    np.save(tmp_path / "calib.npy", calib_ids(_separated_model().config, 16, 32, 51).numpy())
    args = ["rank", tmp_path / "parent", "--calib", tmp_path / "calib.npy", "--seq-len", 32, "--batch-size", 8,
            "--no-progress"]
    _run(*args, "--out", tmp_path / "bf16")
    _run(*args, "--out", tmp_path / "fp32", "--compute-dtype", "float32")
    b, f = load_nested(tmp_path / "bf16"), load_nested(tmp_path / "fp32")
    assert b.model.dtype == f.model.dtype == BF16  # stored bf16 either way
    assert (tmp_path / "bf16" / WEIGHTS).read_bytes() == (tmp_path / "fp32" / WEIGHTS).read_bytes()
    assert b.importance.depth_order == f.importance.depth_order
    torch.testing.assert_close(b.importance.hidden, f.importance.hidden, rtol=0.01, atol=0)
