"""`elastic-export build` and `run`: the build directory, its manifest, and bad input."""

from __future__ import annotations

import hashlib
import json

import pytest
from click.testing import CliRunner

from elastic_export.cli import main
from elastic_fixtures import family, save_nested_fixture
from helpers import random_model


@pytest.fixture(scope="module")
def nested(tmp_path_factory):
    d = tmp_path_factory.mktemp("nested")
    # wide enough that the weights dominate the graphs' structure (tiny models are all structure)
    model = random_model(3, head_order="rank_major", vocab_size=2003, hidden_size=96, intermediate_size=384)
    save_nested_fixture(d / "ck", model, family(model.config, 3, 3))
    return d / "ck", model


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _no_leftovers(parent):
    return not [p for p in parent.iterdir() if p.name.startswith(".")]


def test_build_all_budgets_holds_weights_once(nested, tmp_path):
    ck, model = nested
    out = tmp_path / "b"
    r = _run("build", ck, "--budget", "all", "--target", "onnx", "--out", out)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "build.json").read_text())
    assert sorted(m["budgets"]) == ["b1", "b2", "full"] and m["target"] == "onnx" and m["dtype"] == "float32"
    for fname, rec in m["files"].items():  # checksums and sizes as recorded
        data = (out / fname).read_bytes()
        assert len(data) == rec["bytes"] and hashlib.sha256(data).hexdigest() == rec["sha256"]
    full_bytes = sum(p.numel() * 4 for n, p in model.state_dict().items()
                     if not (model.config.tie_word_embeddings and n == "lm_head.weight"))
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"build dir {total} bytes for {full_bytes} bytes of weights: {total / full_bytes:.3f}x")
    assert total <= 1.05 * full_bytes


def test_build_one_budget_decomposed_bf16_and_run(nested, tmp_path):
    ck, _ = nested
    out = tmp_path / "b"
    r = _run("build", ck, "--budget", "b1", "--target", "onnx", "--ssm-op", "decomposed", "--dtype", "bf16",
             "--out", out)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "build.json").read_text())
    assert list(m["budgets"]) == ["b1"] and m["dtype"] == "bfloat16" and m["opset"] == 18
    r = _run("run", out, "--prompt", "hi", "--max-new-tokens", "5")
    assert r.exit_code == 0, r.output
    assert "tokens/s" in r.output


def test_run_nested_with_torch(nested):
    ck, _ = nested
    r = _run("run", ck, "--budget", "b2", "--prompt", "hello", "--max-new-tokens", "4")
    assert r.exit_code == 0, r.output
    assert "[b2] 4 tokens" in r.output


def test_run_default_model_static_decode():
    """No PATH: the shipped model; --static compiles the fixed-shape step and reports it apart."""
    from elastic_export.build import default_model_path

    if not (default_model_path() / "elastic.json").is_file():
        pytest.skip("the default model is not shipped in this checkout")
    r = _run("run", "--budget", "50pct", "--static", "--prompt", "Q: 3, +4", "--max-new-tokens", "4")
    assert r.exit_code == 0, r.output
    assert "[50pct] 4 tokens" in r.output and "first decode step (compilation)" in r.output


@pytest.mark.parametrize("args, message", [
    (["--budget", "huge"], "unknown budget 'huge'"),
    (["--opset", "18"], "opset 18 is not supported by --ssm-op standard"),
    (["--ssm-op", "decomposed", "--opset", "12"], "opset 12 is not supported by --ssm-op decomposed"),
])
def test_bad_input_exit_2_and_nothing_written(nested, tmp_path, args, message):
    ck, _ = nested
    out = tmp_path / "b"
    r = _run("build", ck, "--target", "onnx", "--out", out, *args)
    assert r.exit_code == 2
    assert message in r.output and len(r.output.strip().splitlines()) == 1
    assert not out.exists() and _no_leftovers(tmp_path)


def test_checksum_failure(nested, tmp_path):
    import shutil

    ck, _ = nested
    bad = tmp_path / "ck"
    shutil.copytree(ck, bad)
    f = bad / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    r = _run("build", bad, "--target", "onnx", "--out", tmp_path / "b")
    assert r.exit_code == 2 and "SHA-256" in r.output
    assert not (tmp_path / "b").exists()


def test_existing_output_needs_overwrite(nested, tmp_path):
    ck, _ = nested
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = _run("build", ck, "--target", "onnx", "--out", out)
    assert r.exit_code == 2 and "already exists" in r.output and "--overwrite" in r.output
    assert (out / "keep.txt").read_text() == "mine"
    r = _run("build", ck, "--target", "onnx", "--budget", "b2", "--out", out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert not (out / "keep.txt").exists() and (out / "build.json").is_file() and _no_leftovers(tmp_path)


def test_trt_target_without_tensorrt(nested, tmp_path, monkeypatch):
    import engines.trt.target as t

    monkeypatch.setattr(t, "trt_availability", lambda: (False, "tensorrt is not installed"))
    ck, _ = nested
    r = _run("build", ck, "--target", "trt", "--out", tmp_path / "b")
    assert r.exit_code == 2 and "tensorrt is not installed" in r.output
    assert not (tmp_path / "b").exists()
    r = _run("build", ck, "--target", "auto", "--budget", "b2", "--out", tmp_path / "b")  # auto falls back
    assert r.exit_code == 0 and json.loads((tmp_path / "b" / "build.json").read_text())["target"] == "onnx"


def test_missing_default_model(tmp_path, monkeypatch):
    import elastic_export.build as b

    monkeypatch.setattr(b, "default_model_path", lambda: tmp_path / "nothing")
    r = _run("build", "--target", "onnx", "--out", tmp_path / "b")
    assert r.exit_code == 2 and "default model" in r.output


def test_trt_target_on_this_machine(nested, tmp_path):
    """Where TensorRT or a GPU is missing (CPU CI), --target trt says which and writes nothing."""
    from engines import trt

    ok, why = trt.availability(need_plugin=False)
    if ok:
        pytest.skip("TensorRT and a GPU are present")
    ck, _ = nested
    r = _run("build", ck, "--target", "trt", "--out", tmp_path / "b")
    assert r.exit_code == 2 and "TensorRT target is unavailable" in r.output and why in r.output
    assert not (tmp_path / "b").exists() and _no_leftovers(tmp_path)


def test_shipped_model_build_and_parity(tmp_path):
    """The README's main command on the shipped model: < 1 minute, then ORT == torch per budget."""
    import time

    import torch

    from elastic_export import default_model_path
    from elastic_export.build import load_family
    from engines.ort_engine import OrtEngine
    from engines.torch_engine import TorchEngine

    if not default_model_path().exists():
        pytest.skip("the default model is not shipped in this checkout")
    t = time.perf_counter()
    r = _run("build", "--budget", "all", "--target", "onnx", "--out", tmp_path / "b")
    took = time.perf_counter() - t
    assert r.exit_code == 0, r.output
    print(f"build of the shipped model: {took:.1f} s")
    assert took < 60
    model, family, _ = load_family(None)
    te, oe = TorchEngine(model, family), OrtEngine(tmp_path / "b", threads=1)
    ids = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    for name in family:
        te.set_budget(name)
        oe.set_budget(name)
        torch.testing.assert_close(oe.prefill(ids), te.prefill(ids), atol=1e-4, rtol=0)
        assert torch.equal(oe.generate(ids, 32), te.generate(ids, 32)), name


def test_run_refuses_a_modified_build(nested, tmp_path):
    ck, _ = nested
    out = tmp_path / "b"
    assert _run("build", ck, "--budget", "b2", "--target", "onnx", "--out", out).exit_code == 0
    with open(out / "weights.bin", "r+b") as f:
        f.seek(100)
        f.write(b"\x01\x02")
    r = _run("run", out, "--prompt", "x", "--max-new-tokens", "2")
    assert r.exit_code == 2 and "SHA-256" in r.output


def test_build_storage_and_compute_dtypes_are_separate(nested, tmp_path):
    """--dtype (stored) follows the source unless given; --compute-dtype is the graphs' arithmetic."""
    ck, _ = nested
    r = _run("build", ck, "--budget", "b1", "--target", "onnx", "--compute-dtype", "bf16", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "b" / "build.json").read_text())
    assert (m["dtype"], m["compute_dtype"], m["source_dtype"]) == ("float32", "bfloat16", "float32")
    from validation.validate import build_precision

    assert build_precision(m) == "bf16"
    assert build_precision({**m, "dtype": "bfloat16", "compute_dtype": "float32", "source_dtype": "bfloat16"}) == "fp32"
    assert build_precision({**m, "dtype": "bfloat16", "compute_dtype": "float32", "source_dtype": "float32"}) == "bf16"
