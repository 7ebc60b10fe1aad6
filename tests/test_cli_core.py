"""CLI rank -> plan -> nest -> slice end to end; bad input exits 2 with one line and writes nothing."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import elastic_export as ee
from elastic_export.cli import main
from helpers import hf_model, random_model


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_user_error(result, *needles):
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in result.output
    for n in needles:
        assert n in err, err


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    m = random_model(0, vocab_size=300)  # 2 groups, 2 KV heads: head prefixes need the sorted order
    m.save_pretrained(d / "parent")
    np.save(d / "calib.npy", np.random.RandomState(0).randint(0, 300, size=400))
    (d / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 3)
    r = run("rank", d / "parent", "--calib", d / "calib.npy", "--calib", d / "calib.txt", "--seq-len", 32,
            "--samples", 8, "--out", d / "sorted")
    assert r.exit_code == 0, r.output
    return d


def test_rank_nest_slice(workdir):
    d = workdir
    sorted_ck = ee.load_nested(d / "sorted")
    parent = ee.load(d / "parent").eval()
    x = torch.randint(0, 300, (2, 19))
    with torch.no_grad():
        assert (parent(x) - sorted_ck.model(x)).abs().max() <= 1e-5
    assert sorted_ck.importance is not None and sorted_ck.importance.depth_order is not None
    r = run("plan", d / "sorted", "--budget", "75%", "--budget", "small=50%", "--json", d / "plan.json")
    assert r.exit_code == 0, r.output
    assert "small" in r.output and "nested (one copy" in r.output
    assert set(json.loads((d / "plan.json").read_text())) == {"full", "75pct", "small"}
    r = run("nest", d / "sorted", "--budget", "75%", "--budget", "50%", "--mode", "heterogeneous",
            "--out", d / "nested")
    assert r.exit_code == 0, r.output
    ck = ee.load_nested(d / "nested")
    assert list(ck.budgets) == ["full", "75pct", "50pct"]
    r = run("slice", d / "nested", "--budget", "all", "--out", d / "slices")
    assert r.exit_code == 0, r.output
    with torch.no_grad():
        for name, sub in ck.budgets.items():
            ref = ck.model(x, subnet=sub)
            sl = ee.load(d / "slices" / name).eval()
            assert (ref - sl(x)).abs().max() <= 1e-5
    r = run("slice", d / "nested", "--budget", "full", "--out", d / "one")
    assert r.exit_code == 0 and (d / "one" / "config.json").is_file()
    with torch.no_grad():
        got = hf_model(d / "one")(x, use_cache=False).logits
        assert (parent(x) - got).abs().max() <= 1e-4  # the full slice is the parent again, HF order


def test_plan_real_scale_from_a_preset():
    r = run("plan", "--preset", "nemotron-nano-v2-12b", "--budget", "9B", "--budget", "6B")
    assert r.exit_code == 0, r.output
    assert "nested (one copy, all 3 budgets): 24.62 GB" in r.output
    assert "separate full + 9B: 42." in r.output


def test_bad_input_exits_2_and_writes_nothing(workdir, tmp_path):
    d = workdir
    out = tmp_path / "out"
    assert_user_error(run("nest", d / "sorted", "--budget", "150%", "--out", out), "more than the parent")
    H = json.loads((d / "plan.json").read_text())["full"]
    for w in H["layers"]:
        if "mamba_heads" in w:
            w["mamba_heads"] = 3  # 2 groups
    (tmp_path / "odd.json").write_text(json.dumps(H))
    assert_user_error(run("nest", d / "sorted", "--budget", f"odd={tmp_path / 'odd.json'}", "--out", out),
                      "split evenly")
    assert_user_error(run("nest", d / "parent", "--budget", "50%", "--out", out), "rank-major")  # unsorted
    r = run("slice", d / "nested", "--budget", "9B", "--out", out)
    assert_user_error(r, "unknown budget '9B'", "full")
    assert_user_error(run("rank", d / "parent", "--calib", tmp_path / "none.npy", "--out", out), "not found")
    assert_user_error(run("plan", "--preset", "nope", "--budget", "50%"), "unknown preset")
    assert not out.exists()


def test_corrupt_checkpoints_exit_2(workdir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(workdir / "nested", bad)
    f = bad / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1
    f.write_bytes(bytes(data))
    assert_user_error(run("slice", bad, "--budget", "full", "--out", tmp_path / "o"), "SHA-256")
    f.write_bytes(bytes(data[:1000]))
    assert_user_error(run("slice", bad, "--budget", "full", "--out", tmp_path / "o"), "truncated")
    assert not (tmp_path / "o").exists()
