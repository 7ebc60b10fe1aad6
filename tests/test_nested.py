"""The nested checkpoint: one weight file, a versioned manifest, checksums, atomic writes, clear errors."""

import json
import random

import pytest
import torch

import elastic_export as ee
from core_helpers import random_subnet, sorted_model
from elastic_export.accounting import count_params
from elastic_export.elastic import LayerWidths, Subnet, full_subnet
from elastic_export.errors import BudgetError, CheckpointError
from elastic_export.nested import FORMAT_VERSION, sha256_file
from elastic_export.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def family():
    _, s, simp = sorted_model(0)
    rng = random.Random(0)
    budgets = {"small": random_subnet(s.config, rng, True), "mid": random_subnet(s.config, rng, False)}
    return s, simp, budgets


def test_roundtrip(family, tmp_path):
    s, simp, budgets = family
    router = {"embed.weight": torch.randn(3, 4)}
    out = ee.save_nested(tmp_path / "nested", s, budgets, router=router, importance=simp, tokenizer=ByteTokenizer(),
                         extra={"fractions": {"mid": 0.6}, "training": {"steps": 3}, "params": {"mid": 1}})
    assert sorted(p.name for p in out.iterdir()) == ["elastic.json", "importance.safetensors", "model.safetensors",
                                                     "router.safetensors", "tokenizer"]
    ck = ee.load_nested(out)
    names = list(ck.budgets)
    params = [count_params(s.config, ck.budgets[n]) for n in names]
    assert names[0] == "full" and params == sorted(params, reverse=True)
    assert ck.budgets["small"] == budgets["small"] and ck.budgets["mid"] == budgets["mid"]
    assert ck.budgets["full"] == full_subnet(s.config)
    mf = ck.manifest
    assert mf["format_version"] == 1 and mf["layout"]["head_order"] == "rank_major"
    assert mf["files"]["model.safetensors"]["sha256"] == sha256_file(out / "model.safetensors")
    entry = next(b for b in mf["budgets"] if b["name"] == "mid")
    assert entry["params"] == count_params(s.config, budgets["mid"]) and entry["hidden"] == budgets["mid"].hidden
    assert [w["type"] for w in entry["layers"]] == s.config.layers_block_type
    assert entry["fraction"] == 0.6 and mf["training"] == {"steps": 3}
    assert all(torch.equal(a, b) for a, b in zip(s.state_dict().values(), ck.model.state_dict().values()))
    assert torch.equal(ck.router["embed.weight"], router["embed.weight"])
    assert torch.equal(ck.importance.hidden, simp.hidden) and ck.importance.depth_order == simp.depth_order
    assert ck.tokenizer_path is not None and not (out / "config.json").exists()
    x = torch.randint(0, s.config.vocab_size, (2, 13))
    with torch.no_grad():
        for n in names:
            assert (ck.model(x, subnet=ck.budgets[n]) - ck.slice(n).eval()(x)).abs().max() <= 1e-5
    with pytest.raises(BudgetError, match="unknown budget 'nope'"):
        ck.subnet("nope")


def test_checksum_mismatch_and_truncation(family, tmp_path):
    s, _, budgets = family
    out = ee.save_nested(tmp_path / "n", s, budgets)
    f = out / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF  # same size, different bytes
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        ee.load_nested(out)
    f.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match="truncated"):
        ee.load_nested(out)
    f.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        ee.load_nested(out)
    with pytest.raises(CheckpointError, match="elastic.json is missing"):
        ee.load_nested(tmp_path)


def test_bad_budgets_write_nothing(family, tmp_path):
    s, _, _ = family
    cfg = s.config
    full = full_subnet(cfg)
    i = cfg.layers_block_type.index("linear_attention")
    broken = list(full.layers)
    broken[i] = LayerWidths(mamba_heads=cfg.n_groups + 1, mamba_head_dim=cfg.mamba_head_dim)
    cases = {
        "outside": {"big": Subnet(cfg.hidden_size + 8, full.layers)},
        "split evenly": {"odd": Subnet(cfg.hidden_size, tuple(broken))},
        "not usable as a file name": {"a/b": full},
        "must be the parent": {"full": Subnet(cfg.hidden_size - 1, full.layers)},
    }
    for msg, budgets in cases.items():
        target = tmp_path / "out"
        with pytest.raises(BudgetError) as e:
            ee.save_nested(target, s, budgets)
        assert msg in str(e.value)
        assert not target.exists() and list(tmp_path.iterdir()) == []


def test_manifest_from_a_newer_version_is_refused(family, tmp_path):
    s, _, budgets = family
    out = ee.save_nested(tmp_path / "n", s, budgets)
    mf = json.loads((out / "elastic.json").read_text())
    mf["format_version"] = FORMAT_VERSION + 1
    (out / "elastic.json").write_text(json.dumps(mf))
    with pytest.raises(CheckpointError, match="format_version"):
        ee.load_nested(out)
