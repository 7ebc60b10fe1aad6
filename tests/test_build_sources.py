"""`build` takes any checkpoint we read (a plain HF one or a slice is a one-budget family), and a
build directory finds its source from anywhere, by absolute path and checksums."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

import elastic_export as ee
from elastic_export.cli import main
from elastic_fixtures import family, save_nested_fixture
from helpers import random_model


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    random_model(5, vocab_size=300).save_pretrained(d / "hf")
    return d / "hf"


def _ids(vocab):
    return torch.randint(3, vocab, (1, 11), generator=torch.Generator().manual_seed(2))


def test_build_hf_checkpoint_and_run(hf_dir, tmp_path):
    from engines.ort_engine import OrtEngine

    r = run("build", hf_dir, "--budget", "all", "--target", "onnx", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "b" / "build.json").read_text())
    assert list(m["budgets"]) == ["full"] and m["source"]["kind"] == "hf"
    assert m["source"]["path"] == str(hf_dir.resolve()) and "model.safetensors" in m["source"]["files"]
    r = run("run", tmp_path / "b", "--prompt", "def f(", "--max-new-tokens", "6")
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert "[full] 6 tokens" in r.output
    model = ee.load(hf_dir)
    ids = _ids(300)
    eng = OrtEngine(tmp_path / "b", threads=1)
    with torch.no_grad():
        torch.testing.assert_close(eng.prefill(ids), model(ids), atol=1e-4, rtol=0)
        assert torch.equal(eng.generate(ids, 8), model.generate(ids, 8))
    r = run("run", hf_dir, "--prompt", "def f(", "--max-new-tokens", "3")  # the torch engine on the HF dir
    assert r.exit_code == 0 and "[full] 3 tokens" in r.output, r.output
    r = run("build", hf_dir, "--budget", "50pct", "--target", "onnx", "--out", tmp_path / "c")
    assert r.exit_code == 2 and "unknown budget '50pct'" in r.output and "full" in r.output


def test_build_a_heterogeneous_slice(tmp_path):
    from engines.ort_engine import OrtEngine

    model = random_model(7, head_order="rank_major", vocab_size=300)
    budgets = family(model.config, 7, 2)
    save_nested_fixture(tmp_path / "nested", model, budgets)
    name = next(n for n in budgets if n != "full")
    r = run("slice", tmp_path / "nested", "--budget", name, "--layout", "compact", "--out", tmp_path / "slice")
    assert r.exit_code == 0, r.output
    assert ee.load(tmp_path / "slice").config.layer_widths is not None  # the compact heterogeneous layout
    r = run("build", tmp_path / "slice", "--target", "onnx", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    ids = _ids(300)
    with torch.no_grad():
        ref = model.generate(ids, 8, subnet=budgets[name])
    assert torch.equal(OrtEngine(tmp_path / "b", threads=1).generate(ids, 8), ref)
    # the padded layout (the default) is a plain checkpoint: it builds and runs as the model it is
    r = run("slice", tmp_path / "nested", "--budget", name, "--out", tmp_path / "padded")
    assert r.exit_code == 0 and run("build", tmp_path / "padded", "--out", tmp_path / "bp").exit_code == 0
    with torch.no_grad():
        padded = ee.load(tmp_path / "padded")
        assert padded.config.padded_widths is not None
        assert torch.equal(OrtEngine(tmp_path / "bp", threads=1).generate(ids, 8), padded.generate(ids, 8))


def _validate(build, report):
    return run("validate", build, "--report", report, "--backends", "torch,ort-standard", "--no-memory", "--tasks", "0",
               "--greedy-tokens", "2", "--quiet", "--device", "custom:8")


def test_build_dir_is_not_tied_to_the_cwd(hf_dir, tmp_path, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    shutil.copytree(hf_dir, work / "ck")
    monkeypatch.chdir(work)
    r = run("build", "ck", "--target", "onnx", "--out", "b")  # relative paths, as a user types them
    assert r.exit_code == 0, r.output
    monkeypatch.chdir(elsewhere)
    r = _validate(work / "b", "report")
    assert r.exit_code == 0 and "PASSED" in r.output and "ort-standard" in r.output, r.output

    # the source changed since the build: said so, exit 2
    (work / "ck" / "config.json").write_text((work / "ck" / "config.json").read_text() + " ")
    r = _validate(work / "b", "report2")
    assert r.exit_code == 2 and "config.json has changed" in r.output and str(work / "ck") in r.output, r.output
    # the source is gone (moved away)
    (work / "ck").rename(work / "moved")
    r = _validate(work / "b", "report3")
    assert r.exit_code == 2 and "no longer exists" in r.output and str(work / "ck") in r.output, r.output
    assert "Traceback" not in r.output


def test_build_of_a_nested_checkpoint_knows_its_source(tmp_path):
    """The record of a nested source is its manifest's checksums; another checkpoint in its place is refused."""
    from elastic_export.build import build_source

    model = random_model(8, head_order="rank_major", vocab_size=300)
    save_nested_fixture(tmp_path / "nested", model, family(model.config, 8, 2))
    r = run("build", tmp_path / "nested", "--budget", "full", "--target", "onnx", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "b" / "build.json").read_text())["source"]
    assert rec["kind"] == "nested" and rec["files"]["model.safetensors"] == \
        json.loads((tmp_path / "nested" / "elastic.json").read_text())["files"]["model.safetensors"]
    assert build_source(tmp_path / "b") == (tmp_path / "nested").resolve()
    other = random_model(9, head_order="rank_major", vocab_size=300)
    save_nested_fixture(tmp_path / "nested", other, family(other.config, 9, 2))  # replaced in place
    with pytest.raises(ee.CheckpointError, match="model.safetensors has changed"):
        build_source(tmp_path / "b")
