"""A bf16 family end to end through build and validate (issue 13): the weights stay bf16 on disk and in
memory, and the float32 computations over them (ONNX Runtime's upcast, the torch reference's
per-layer upcast) equal a float32 copy's, so they are judged with the float32 thresholds."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("onnxruntime")

from elastic_export.build import build  # noqa: E402
from elastic_export.nested import save_nested  # noqa: E402
from elastic_export.tokenizer import ByteTokenizer  # noqa: E402
from engines.ort_engine import OrtEngine, _cast_late  # noqa: E402
from val_helpers import EVAL, one_thread, small_family  # noqa: E402,F401 (fixture)
from validation.backends import Sliced, TorchElastic, Upcast, forward_f32  # noqa: E402
from validation.thresholds import THRESHOLDS  # noqa: E402
from validation.validate import load_family, validate  # noqa: E402

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory):
    model, budgets = small_family(3)
    model = model.to(BF16)
    root = tmp_path_factory.mktemp("bf16fam")
    save_nested(root / "nested", model, budgets, tokenizer=ByteTokenizer())
    build(root / "nested", root / "build")  # no dtype: as stored
    return model, budgets, root


def test_build_stores_bf16_as_the_source_and_computes_fp32(bf16_family):
    model, _, root = bf16_family
    m = json.loads((root / "build" / "build.json").read_text())
    assert (m["dtype"], m["compute_dtype"], m["source_dtype"]) == ("bfloat16", "float32", "bfloat16")
    n = sum(p.numel() for p in model.parameters())
    assert m["weights"]["bytes"] < 2.2 * n  # 2 bytes a weight (plus alignment), not 4


@torch.no_grad()
def test_forward_f32_equals_a_float32_copy(bf16_family):
    model, budgets, _ = bf16_family
    f32 = copy.deepcopy(model).float()
    ids = torch.randint(3, model.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    for s in budgets.values():
        c1, c2 = model.new_cache(), f32.new_cache()
        got, want = forward_f32(model, ids, s, c1, mask), f32(ids, subnet=s, cache=c2, attention_mask=mask)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        tok = ids[:, :1]
        torch.testing.assert_close(forward_f32(model, tok, s, c1), f32(tok, subnet=s, cache=c2), atol=1e-4, rtol=0)
    assert model.dtype == BF16  # nothing was converted in place
    assert TorchElastic(model, budgets).model is model  # the reference holds no copy


def test_sliced_keeps_the_stored_dtype(bf16_family):
    model, budgets, _ = bf16_family
    be = Sliced(model, budgets)
    be.set_budget("b50")
    assert be.model.dtype == BF16 and be.upcast and be.parent is model
    be.close()


def test_bf16_build_on_ort_matches_the_fp32_reference(bf16_family):
    """ONNX Runtime's logits of a bf16-stored build of a bf16 checkpoint are judged with the float32
    thresholds against the float32 reference (the torch elastic forward, upcast per layer)."""
    _, _, root = bf16_family
    fam = load_family(root / "build")
    assert fam.model.dtype == BF16 and fam.engines["ort-standard"][1] == "fp32"
    rep = validate(fam, None, backends=["torch", "ort-standard", "torch-engine"], measure_memory=False,
                   progress=False, eval_kwargs=EVAL)
    rows = {(r["backend"], r["budget"]): r for r in rep["parity"]}
    for b in fam.budgets:
        ort_row = rows[("ort-standard", b)]
        assert ort_row["precision"] == "fp32" and ort_row["passed"], ort_row
        assert ort_row["metrics"]["abs_logit"] <= THRESHOLDS["fp32"]["max_abs_logit"]
        assert rows[("torch", b)]["passed"]
        eng = rows[("torch-engine", b)]  # served as stored: bf16 arithmetic, bf16 thresholds
        assert eng["precision"] == "bf16" and eng["passed"], eng


def test_bf16_build_shares_one_float32_buffer(bf16_family):
    """Every session of every budget reads its weights from the engine's one float32 buffer (twice
    the bf16 file, allocated once): no per-session folded copy."""
    model, _, root = bf16_family
    oe = OrtEngine(root / "build", threads=1)
    assert oe.share and oe._scale == 2
    nbytes = (root / "build" / "weights.bin").stat().st_size
    assert oe.buffer.nbytes == 2 * nbytes
    base, end = oe.buffer.ctypes.data, oe.buffer.ctypes.data + oe.buffer.nbytes
    assert len(oe.sessions) == 3 and all(len(s) == 2 for s in oe.sessions.values())
    assert oe._values and all(base <= v.data_ptr() < end for v in oe._values.values())
    assert all(v.data_type() == "tensor(float)" for v in oe._values.values())
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    before = oe.prefill(ids).clone()
    unshared = OrtEngine(root / "build", threads=1, share_weights=False)  # ONNX Runtime's own folding
    np.testing.assert_allclose(unshared.prefill(ids).numpy(), before.numpy(), atol=1e-4)
    oe.buffer[:] = 0  # the sessions see the buffer: proof that nothing was copied
    assert not torch.equal(oe.prefill(ids), before)


def test_bf16_build_cast_per_call_is_one_stored_copy_with_the_same_logits(bf16_family):
    """``upcast=False`` (validate's default): the shared buffer holds the bf16 bytes as stored (the
    file's size, not twice it), the graphs keep their Casts (each moved to just before its consumer), and
    every budget's prefill and decode logits equal the upcast engine's to float32 rounding (the same
    float32 values into the same MatMuls; a kernel may accumulate in another order)."""
    model, _, root = bf16_family
    nbytes = (root / "build" / "weights.bin").stat().st_size
    up, cast = OrtEngine(root / "build", threads=1), OrtEngine(root / "build", threads=1, upcast=False)
    assert cast.cast_per_call and not up.cast_per_call and cast._scale == 1
    assert cast.buffer.nbytes == nbytes and up.buffer.nbytes == 2 * nbytes
    assert any(v.data_type() == "tensor(bfloat16)" for v in cast._values.values())
    base, end = cast.buffer.ctypes.data, cast.buffer.ctypes.data + cast.buffer.nbytes
    assert all(base <= v.data_ptr() < end for v in cast._values.values())
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, model.config.vocab_size, (2, 13), generator=g)
    for b in up.budgets:
        up.set_budget(b)
        cast.set_budget(b)
        torch.testing.assert_close(cast.prefill(ids), up.prefill(ids), atol=2e-5, rtol=0)
        for _ in range(3):
            tok = torch.randint(3, model.config.vocab_size, (2,), generator=g)
            torch.testing.assert_close(cast.decode(tok), up.decode(tok), atol=2e-5, rtol=0)
    cast.buffer[:] = 0  # the sessions read the shared bf16 buffer, not a folded copy of their own
    cast.set_budget(cast.budgets[0])
    assert (cast.prefill(ids) - up.prefill(ids)).abs().max() > 1e-2
    proto = onnx.load(str(root / "build" / "b50.decode.onnx"), load_external_data=False)
    assert _cast_late(proto) > 0  # every moved Cast reads a view that waits for its consumer's input
    order = {o: i for i, n in enumerate(proto.graph.node) for o in n.output}
    for i, n in enumerate(proto.graph.node):
        if n.op_type == "Cast" and "__late" in n.input[0]:
            assert i == order[n.output[0]] and i > min(i2 for i2, m in enumerate(proto.graph.node)
                                                        if n.output[0] in m.input) - 4


def test_validate_cli_ort_weights(bf16_family, tmp_path):
    """``--ort-weights`` reaches the engine and the report; both settings pass the same rows."""
    import json as _json

    from click.testing import CliRunner

    from elastic_export.cli import main

    _, _, root = bf16_family
    args = ["validate", str(root / "build"), "--backends", "ort-standard", "--budget", "b50", "--no-memory",
            "--quiet", "--tasks", "1", "--greedy-tokens", "3", "--prompts", "2", "--rows", "2", "--seq-len", "12",
            "--decode-steps", "2"]
    metrics = {}
    for w in ("stored", "float32"):
        r = CliRunner().invoke(main, args + ["--report", str(tmp_path / w), "--ort-weights", w])
        assert r.exit_code == 0, r.output
        rep = _json.loads((tmp_path / w / "report.json").read_text())
        assert rep["eval"]["ort_weights"] == w
        metrics[w] = [row["metrics"] for row in rep["parity"] if row["backend"] == "ort-standard"]
    for a, b in zip(metrics["stored"], metrics["float32"]):
        assert a.keys() == b.keys() and a, (a, b)
        for k in a:
            assert a[k] == b[k] or math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-5), (k, a[k], b[k])
    r = CliRunner().invoke(main, args + ["--report", str(tmp_path / "x"), "--ort-weights", "fp16"])
    assert r.exit_code == 2 and "--ort-weights" in r.output


def test_run_cli_ort_weights(bf16_family, tmp_path, monkeypatch):
    """``run --ort-weights stored`` generates the same greedy text as the upcast default from a bf16 build;
    on a checkpoint (the torch engine) the option is refused with exit code 2."""
    from click.testing import CliRunner

    import engines.ort_engine as ort_engine
    from elastic_export.cli import main

    _, _, root = bf16_family
    seen = []

    class Spy(OrtEngine):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            seen.append(self.cast_per_call)

    monkeypatch.setattr(ort_engine, "OrtEngine", Spy)
    args = ["run", str(root / "build"), "--budget", "b50", "--prompt", "The cat sat", "--max-new-tokens", "9",
            "--threads", "1"]
    text = {}
    for w in (None, "stored", "float32"):
        r = CliRunner().invoke(main, args + ([] if w is None else ["--ort-weights", w]))
        assert r.exit_code == 0, r.output
        text[w] = r.stdout.splitlines()[0]
    assert seen == [False, True, False]  # the default and float32 upcast; stored casts per call
    assert text[None] == text["stored"] == text["float32"] and len(text[None]) > len("The cat sat")
    r = CliRunner().invoke(main, ["run", str(root / "nested"), "--prompt", "x", "--max-new-tokens", "2",
                                  "--ort-weights", "stored"])
    assert r.exit_code == 2 and "--ort-weights" in r.output and "Traceback" not in r.output
