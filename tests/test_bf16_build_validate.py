"""A bf16 family end to end through build and validate (issue 13): the weights stay bf16 on disk and in
memory, and the float32 computations over them (ONNX Runtime's upcast, the torch reference's
per-layer upcast) equal a float32 copy's, so they are judged with the float32 thresholds."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from elastic_export.build import build  # noqa: E402
from elastic_export.nested import save_nested  # noqa: E402
from elastic_export.tokenizer import ByteTokenizer  # noqa: E402
from engines.ort_engine import OrtEngine  # noqa: E402
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
