"""Importance scores follow the paper's equations; calibration data from token and text files."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core_helpers import calib_ids
from elastic_export.errors import ConfigError
from elastic_export.importance import compute_importance, depth_scores, load_calibration
from helpers import random_model


def _mixer_inputs(model, ids):
    """X = RMSNorm(h) seen by every mixer, and the final normed hidden states."""
    seen = {}
    hooks = [blk.mixer.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0].clone()))
             for i, blk in enumerate(model.backbone.layers)]
    with torch.no_grad():
        h = model.hidden_states(ids)
    for hk in hooks:
        hk.remove()
    return seen, h


def test_width_scores_match_the_equations():
    m = random_model(0).eval()  # 2 groups, 2 KV heads
    cfg = m.config
    ids = calib_ids(cfg, 3, 20)
    imp = compute_importance(m, ids, batch_size=2, depth="none")
    X, hfin = _mixer_inputs(m, ids)
    # Eq. 1: |RMSNorm(X)| summed over batch, sequence and every norm
    emb = sum(x.abs().sum((0, 1)) for x in X.values()) + hfin.abs().sum((0, 1))
    torch.testing.assert_close(imp.hidden.float(), emb, rtol=1e-4, atol=1e-4)
    for i, t in enumerate(cfg.layers_block_type):
        mix = m.backbone.layers[i].mixer
        if t == "mlp":  # Eq. 2
            ref = F.linear(X[i], mix.up_proj.weight).abs().sum((0, 1))
            torch.testing.assert_close(imp.layers[i]["ffn"].float(), ref, rtol=1e-4, atol=1e-4)
        elif t == "linear_attention":  # Eqs. 3/4
            H, P = mix.num_heads, mix.head_dim
            s = F.linear(X[i], mix.in_proj.weight[H * P:2 * H * P]).sum((0, 1)).view(H, P)
            torch.testing.assert_close(imp.layers[i]["channels"].float(), s.norm(dim=0), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(imp.layers[i]["heads"].float(), s.norm(dim=1), rtol=1e-4, atol=1e-4)
        else:  # per-head attention output norms, GQA with head h in KV group h // (H / nkv)
            H, nkv, hd = mix.num_heads, mix.num_kv_heads, mix.head_dim
            q = F.linear(X[i], mix.q_proj.weight).unflatten(-1, (H, hd)).transpose(1, 2)
            k = F.linear(X[i], mix.k_proj.weight).unflatten(-1, (nkv, hd)).transpose(1, 2)
            v = F.linear(X[i], mix.v_proj.weight).unflatten(-1, (nkv, hd)).transpose(1, 2)
            k, v = k.repeat_interleave(H // nkv, 1), v.repeat_interleave(H // nkv, 1)
            L = q.shape[2]
            att = (q @ k.transpose(-1, -2) * hd ** -0.5).masked_fill(~torch.ones(L, L).tril().bool(), -torch.inf)
            o = att.softmax(-1) @ v
            torch.testing.assert_close(imp.layers[i]["heads"].float(), o.norm(dim=-1).sum((0, 2)),
                                       rtol=1e-4, atol=1e-4)
    assert all(p.grad is None for p in m.parameters())


def test_head_score_over_top_channels():
    m = random_model(1).eval()
    ids = calib_ids(m.config, 2, 16)
    imp = compute_importance(m, ids, depth="none", head_channels=2)
    X, _ = _mixer_inputs(m, ids)
    i = m.config.layers_block_type.index("linear_attention")
    mix = m.backbone.layers[i].mixer
    H, P = mix.num_heads, mix.head_dim
    s = F.linear(X[i], mix.in_proj.weight[H * P:2 * H * P]).sum((0, 1)).view(H, P)
    top = s.norm(dim=0).topk(2).indices
    torch.testing.assert_close(imp.layers[i]["heads"].float(), s[:, top].norm(dim=1), rtol=1e-4, atol=1e-4)


def _squared_error(m, ids, full, j, subnet=None) -> float:
    """Eq. 5's numerator, computed directly: sum of squared logit differences with layer j skipped."""
    return float(((full - m(ids, subnet=subnet, skip_layer=j).double()) ** 2).sum())


def test_depth_normalized_mse_oneshot_and_iterative():
    m = random_model(2).eval()
    cfg = m.config
    ids = calib_ids(cfg, 2, 16)
    scores, order = depth_scores(m, [ids], "oneshot")
    with torch.no_grad():
        full = m(ids).double()
        for j in range(cfg.num_hidden_layers):
            ref = _squared_error(m, ids, full, j) / float((full ** 2).sum())
            assert abs(scores[j].item() - ref) <= 1e-6 * max(1.0, ref)
    assert order == sorted(range(cfg.num_hidden_layers), key=lambda j: scores[j].item())
    it_scores, it_order = depth_scores(m, [ids], "iterative")
    assert sorted(it_order) == list(range(cfg.num_hidden_layers))
    assert it_order[0] == order[0] and it_scores[order[0]] == pytest.approx(scores[order[0]].item())


def test_calibration_files(tmp_path):
    V = 300
    ids = np.random.RandomState(0).randint(0, V, size=250)
    np.save(tmp_path / "a.npy", ids)
    ids.astype("<u2").tofile(tmp_path / "b.bin")
    (tmp_path / "c.txt").write_text(" ".join(map(str, ids[:100])))
    (tmp_path / "d.md").write_text("héllo, world " * 10)
    out = load_calibration([tmp_path / "a.npy"], V, seq_len=50)
    assert out.shape == (5, 50) and torch.equal(out.flatten(), torch.from_numpy(ids))
    assert torch.equal(load_calibration(tmp_path / "b.bin", V, 50), out)
    assert torch.equal(load_calibration(tmp_path / "c.txt", V, 50).flatten(), torch.from_numpy(ids[:100]))
    text = load_calibration(tmp_path / "d.md", V, 10)
    assert text[0, 0].item() == ord("h") + 3  # byte-level ids
    assert load_calibration(tmp_path, V, 50, num_samples=3).shape == (3, 50)  # a directory: every file


def test_calibration_errors(tmp_path):
    np.save(tmp_path / "big.npy", np.array([1, 2, 999]))
    with pytest.raises(ConfigError, match="outside the model's vocabulary"):
        load_calibration(tmp_path / "big.npy", 100, 2)
    with pytest.raises(ConfigError, match="fewer than one window"):
        load_calibration(tmp_path / "big.npy", 1000, 8)
    with pytest.raises(ConfigError, match="not found"):
        load_calibration(tmp_path / "missing.npy", 100, 2)
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ConfigError, match="whole number"):
        load_calibration(tmp_path / "odd.bin", 100, 2)


def test_iterative_depth_rescores_after_each_removal():
    """Each layer's iterative score is Eq. 5 measured with the layers removed before it already gone."""
    from elastic_export.importance import _skip_subnet

    m = random_model(3).eval()
    cfg = m.config
    ids = calib_ids(cfg, 2, 16)
    scores, order = depth_scores(m, [ids], "iterative")
    with torch.no_grad():
        full = m(ids).double()
        den = float((full ** 2).sum())
        for k, j in enumerate(order[:-1]):
            gone = set(order[:k])
            ref = _squared_error(m, ids, full, j, _skip_subnet(cfg, gone)) / den
            assert abs(scores[j].item() - ref) <= 1e-6 * max(1.0, ref), (k, j)
            rest = [i for i in range(cfg.num_hidden_layers) if i not in gone]
            cand = {i: _squared_error(m, ids, full, i, _skip_subnet(cfg, gone)) for i in rest}
            assert j == min(rest, key=lambda i: (cand[i], i))  # the least important of what is left goes next
    oneshot, _ = depth_scores(m, [ids], "oneshot")
    assert not torch.allclose(scores[order[1]], oneshot[order[1]])  # re-scored, not the one-shot score
