"""Validation of ONNX builds: a correct build passes; a perturbed weight, a decode graph that drops a
state output, and a tampered file fail."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("onnxruntime")
pytest.importorskip("engines.ort_engine")

import onnx  # noqa: E402

from elastic_export.build import build  # noqa: E402
from elastic_export.cli import main  # noqa: E402
from elastic_export.errors import CheckpointError  # noqa: E402
from elastic_export.nested import save_nested  # noqa: E402
from elastic_export.onnx_graph import WeightFile  # noqa: E402
from elastic_export.tokenizer import ByteTokenizer  # noqa: E402
from val_helpers import EVAL, one_thread, small_family  # noqa: E402,F401 (fixture)
from validation.validate import load_family, validate  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model, budgets = small_family()
    root = tmp_path_factory.mktemp("onnx")
    save_nested(root / "nested", model, budgets, tokenizer=ByteTokenizer())
    build(root / "nested", root / "build", ssm_op="standard")
    return model, root


def _copy(root, tmp_path):
    out = tmp_path / "build"
    shutil.copytree(root / "build", out)
    return out


def _reseal(build_dir, fname):
    """Record a changed file's new SHA-256, as a buggy exporter would have written it."""
    mf = build_dir / "build.json"
    manifest = json.loads(mf.read_text())
    manifest["files"][fname]["sha256"] = hashlib.sha256((build_dir / fname).read_bytes()).hexdigest()
    mf.write_text(json.dumps(manifest))


def _validate(path, **kw):
    fam = load_family(path)
    return validate(fam, None, measure_memory=False, progress=False, eval_kwargs=EVAL, **kw)


def test_build_passes(built):
    _, root = built
    rep = _validate(root / "build", backends=["torch", "ort-standard"])
    assert rep["passed"], rep["failures"]
    assert {r["backend"] for r in rep["parity"]} == {"torch", "ort-standard"}
    assert all(r["metrics"]["abs_logit"] < 1e-4 for r in rep["parity"])


def test_perturbed_weight_of_built_graph_fails(built, tmp_path):
    model, root = built
    out = _copy(root, tmp_path)
    layer = next(i for i, t in enumerate(model.config.layers_block_type) if t == "linear_attention")
    m = model.backbone.layers[layer].mixer
    offset, shape = WeightFile(model, model.dtype).entries[f"backbone.layers.{layer}.mixer.in_proj.weight"]
    w = np.memmap(out / "weights.bin", dtype=np.float32, mode="r+")
    w[offset // 4 + m.num_heads * m.head_dim * shape[1]] += 1.0  # x part, head 0, channel 0, column 0: every budget
    w.flush()
    del w
    with pytest.raises(CheckpointError, match="SHA-256"):  # as shipped: the checksum catches it first
        load_family(out)
    _reseal(out, "weights.bin")  # as an exporter bug would write it: only the numbers can tell
    rep = _validate(out, backends=["ort-standard"])
    assert not rep["passed"]
    assert all(not r["passed"] and r["failed"][0].startswith("abs_logit") for r in rep["parity"])


def test_decode_graph_without_state_output_fails(built, tmp_path):
    _, root = built
    out = _copy(root, tmp_path)
    fname = "full.decode.onnx"
    proto = onnx.load(str(out / fname), load_external_data=False)
    dropped = next(o for o in proto.graph.output if o.name.endswith(".ssm"))
    proto.graph.output.remove(dropped)
    onnx.save(proto, str(out / fname))
    _reseal(out, fname)
    rep = _validate(out, backends=["ort-standard"])
    rows = {r["budget"]: r for r in rep["parity"]}
    assert not rep["passed"] and not rows["full"]["passed"]
    assert rows["b75"]["passed"] and rows["b50"]["passed"]


def test_validate_build_cli(built, tmp_path):
    _, root = built
    r = CliRunner().invoke(main, ["validate", str(root / "build"), "--report", str(tmp_path / "r"), "--no-memory",
                                  "--backends", "ort-standard", "--budget", "b50", "--tasks", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["source"]["build"] == str(root / "build") and rep["backends"] == ["ort-standard"]


def test_bf16_build_judged_with_bf16_thresholds(built, tmp_path):
    _, root = built
    build(root / "nested", tmp_path / "bf16", ssm_op="standard", dtype="bf16")
    fam = load_family(root / "nested", [tmp_path / "bf16"])
    assert fam.engines["ort-standard-bf16"][1] == "bf16"
    rep = validate(fam, None, backends=["ort-standard-bf16"], budgets=["b50"], measure_memory=False, progress=False,
                   eval_kwargs=EVAL)
    (row,) = rep["parity"]
    assert row["precision"] == "bf16" and row["passed"], row
    assert row["metrics"]["abs_logit"] > 1e-4  # really bf16: the fp32 thresholds would fail it


def test_default_model_validates_over_torch_and_ort(tmp_path):
    from elastic_export.build import default_model_path

    if not (default_model_path() / "elastic.json").is_file():
        pytest.skip("the shipped default model is not installed on this branch")
    r = CliRunner().invoke(main, ["validate", "--report", str(tmp_path / "r"), "--backends", "torch,ort-standard",
                                  "--no-memory", "--tasks", "4", "--quiet"])
    assert r.exit_code == 0, r.output
    for name in ("report.json", "report.md", "accuracy_vs_params.png", "memory.png", "parity.png"):
        assert (tmp_path / "r" / name).is_file()
