"""`elastic-export validate` end to end on a small nested checkpoint: report files, plots, memory, exit codes."""

from __future__ import annotations

import importlib.util
import json

import pytest
from click.testing import CliRunner

from elastic_export.cli import main
from elastic_export.nested import save_nested
from elastic_export.tokenizer import ByteTokenizer
from val_helpers import one_thread, small_family  # noqa: F401 (fixture)

HAS_ORT_ENGINE = importlib.util.find_spec("engines.ort_engine") is not None
SMALL = ["--tasks", "2", "--greedy-tokens", "6", "--quiet"]


@pytest.fixture(scope="module")
def nested(tmp_path_factory):
    model, budgets = small_family()
    path = tmp_path_factory.mktemp("val") / "nested"
    save_nested(path, model, budgets, tokenizer=ByteTokenizer())
    return path


@pytest.fixture(scope="module")
def validated(nested, tmp_path_factory):
    out = tmp_path_factory.mktemp("val") / "report"
    r = CliRunner().invoke(main, ["validate", str(nested), "--report", str(out), "--device", "orin-nano-8gb", *SMALL])
    return r, out


def test_validate_passes_and_writes_the_report(validated):
    r, out = validated
    assert r.exit_code == 0, r.output
    assert "PASSED" in r.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["schema"] == "elastic-export/validation-report" and rep["schema_version"] == 1
    assert rep["passed"] and not rep["failures"]
    assert {"torch", "sliced"} <= set(rep["backends"])
    if HAS_ORT_ENGINE:
        assert any(b.startswith("ort-") for b in rep["backends"])
    assert {row["budget"] for row in rep["parity"]} == {"full", "b75", "b50"}
    params = [rep["source"]["budgets"][b]["params"] for b in ("full", "b75", "b50")]
    assert params == sorted(params, reverse=True)
    md = (out / "report.md").read_text()
    assert md.startswith("# Validation report: PASSED") and "## Accuracy parity" in md and "Jetson Orin Nano" in md


def test_plots_open_as_images(validated):
    import matplotlib.image as mpimg

    _, out = validated
    rep = json.loads((out / "report.json").read_text())
    assert {"accuracy_vs_params.png", "memory.png", "parity.png", "plan.png"} <= set(rep["plots"])
    for name in rep["plots"]:
        img = mpimg.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0


def test_memory_parity_measured(validated):
    _, out = validated
    mem = json.loads((out / "report.json").read_text())["memory"]
    counted = mem["memory"]
    assert counted["nested"] == counted["per_budget"]["full"] == counted["loaded"]
    assert counted["separate"] == sum(counted["per_budget"].values()) > counted["nested"]
    assert mem["disk"]["separate"] > mem["disk"]["nested"] >= counted["nested"]
    peak = mem["peak"]
    # one process serving every budget costs about what the largest budget alone costs ...
    assert peak["family"] <= 1.1 * peak["largest_single"]
    # ... and less than separate processes, also net of the per-process baseline
    assert peak["separate_sum"] > 2 * peak["family"] and peak["separate_net"] > peak["family_net"] > 0


def test_failed_threshold_exits_1(nested, tmp_path):
    r = CliRunner().invoke(main, ["validate", str(nested), "--report", str(tmp_path / "r"), "--no-memory",
                                  "--backends", "sliced", "--budget", "b50", "--threshold", "fp32.max_abs_logit=0",
                                  *SMALL])
    assert r.exit_code == 1, r.output
    assert "FAIL" in r.output
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert not rep["passed"] and rep["failures"][0].startswith("sliced / b50: abs_logit")
    assert "FAILED" in (tmp_path / "r" / "report.md").read_text()


@pytest.mark.parametrize("args", [
    ["{missing}"],
    ["{nested}", "--device", "h300"],
    ["{nested}", "--budget", "nope"],
    ["{nested}", "--backends", "tensorflow"],
    ["{nested}", "--threshold", "fp32.max_abs_logit"],
    ["{nested}", "--context", "0"],
])
def test_bad_input_exits_2(nested, tmp_path, args):
    args = [a.format(nested=nested, missing=tmp_path / "missing") for a in args]
    r = CliRunner().invoke(main, ["validate", *args, "--report", str(tmp_path / "r"), "--no-memory", *SMALL])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error:") and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "report.json").exists()


def test_hf_checkpoint_validates_as_one_budget(tmp_path):
    """A plain HF checkpoint (a slice) is a family of one budget, 'full'."""
    from elastic_export.slicing import slice_budget
    from validation.validate import load_family, validate

    model, budgets = small_family()
    slice_budget(model, budgets["b75"]).save_pretrained(tmp_path / "hf")
    fam = load_family(tmp_path / "hf")
    assert list(fam.budgets) == ["full"] and not any(n.startswith("ort-") for n in fam.engines)
    rep = validate(fam, None, backends=["torch", "sliced"], measure_memory=False, progress=False,
                   eval_kwargs={"n_tasks": 1, "greedy_tokens": 4})
    assert rep["passed"], rep["failures"]


def test_small_models_validate_on_one_thread_and_the_caller_keeps_its_threads():
    """Without --threads, a small model runs on 1 thread (its tiny ops gain nothing from more); the
    process's thread count is what it was afterwards, and the report says what ran."""
    import torch

    from validation.validate import SMALL_MODEL_PARAMS, default_threads, validate

    assert default_threads(SMALL_MODEL_PARAMS - 1) == 1 and default_threads(SMALL_MODEL_PARAMS) is None
    model, budgets = small_family()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        from elastic_export.tokenizer import ByteTokenizer
        from validation.backends import Family
        fam = Family(model=model, budgets=budgets, tokenizer=ByteTokenizer())
        rep = validate(fam, None, backends=["torch"], measure_memory=False, progress=False,
                       eval_kwargs={"n_tasks": 1, "greedy_tokens": 3})
        assert rep["machine"]["cpu_threads"] == 1 and fam.threads == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
