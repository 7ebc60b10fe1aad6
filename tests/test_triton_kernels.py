"""Triton SSD kernels against the torch reference (float64), on random inputs with odd sizes.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before triton is
imported); sizes stay tiny because the interpreter is slow. With CUDA the same tests run on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from elastic_export import ssd  # noqa: E402
from engines.kernels import disable_triton_kernels, enable_triton_kernels  # noqa: E402
from engines.kernels import ssd_triton as K  # noqa: E402
from tests.helpers import random_model  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1 (set it before triton is imported)",
                allow_module_level=True)

# fp32 on the GPU uses IEEE dots; low precision inputs use TF32 dots there.
TOL = {torch.float32: 2e-5, torch.float16: 2e-5 if DEV == "cpu" else 3e-3,
       torch.bfloat16: 2e-5 if DEV == "cpu" else 3e-3}


def inputs(b, l, h, p, g, n, dtype=torch.float32, init=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen)
    dt = torch.rand(b, l, h, generator=gen) * 0.9 + 0.02
    A = -(torch.rand(h, generator=gen) * 2.5 + 0.2)
    B = torch.randn(b, l, g, n, generator=gen)
    C = torch.randn(b, l, g, n, generator=gen)
    s0 = torch.randn(b, h, p, n, generator=gen) if init else None
    x, B, C = (t.to(dtype) for t in (x, B, C))
    return [None if t is None else t.to(DEV) for t in (x, dt, A, B, C, s0)]


def reference(x, dt, A, B, C, chunk, s0, order):
    d = lambda t: None if t is None else t.double().cpu()  # noqa: E731
    return ssd.ssd_chunked(d(x), d(dt), d(A), d(B), d(C), chunk, d(s0), order)


def close(got, want, tol):
    scale = want.abs().max().item() + 1.0
    err = (got.double().cpu() - want).abs().max().item()
    assert err <= tol * scale, f"max error {err:.3g} > {tol:.1g} x {scale:.3g}"


@pytest.mark.parametrize("order", ["group_contiguous", "rank_major"])
@pytest.mark.parametrize("b,l,h,p,g,n,chunk,init", [
    (2, 37, 6, 10, 2, 12, 16, True),   # l not a multiple of the chunk, batch > 1, 2 groups
    (1, 50, 9, 6, 3, 8, 8, False),     # 3 groups, no initial state, chunk 8 (kernel uses 16)
    (3, 5, 4, 20, 4, 24, 16, True),    # shorter than a chunk, head dim > 16 (two P blocks), n=24
    (2, 64, 2, 6, 1, 8, 32, True),     # an exact multiple of the chunk
    (2, 1, 4, 6, 2, 8, 16, True),      # one token
])
def test_scan_matches_reference(order, b, l, h, p, g, n, chunk, init):
    args = inputs(b, l, h, p, g, n, init=init, seed=l + h)
    y, final = K.ssd_chunked(*args[:5], chunk, args[5], order)
    yr, fr = reference(*args[:5], chunk, args[5], order)
    assert y.dtype == final.dtype == torch.float32
    assert y.shape == (b, l, h, p) and final.shape == (b, h, p, n)
    close(y, yr, TOL[torch.float32])
    close(final, fr, TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scan_low_precision_inputs(dtype):
    args = inputs(2, 29, 6, 10, 2, 12, dtype=dtype, seed=3)
    y, final = K.ssd_chunked(*args[:5], 16, args[5], "rank_major")
    yr, fr = reference(*args[:5], 16, args[5], "rank_major")  # same rounded inputs, in float64
    close(y, yr, TOL[dtype])
    close(final, fr, TOL[dtype])


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_scan_low_precision_dots(dtype, tol):
    """DOT_LOW: dot operands rounded to the input dtype (the fast mode); the state stays float32."""
    if DEV == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter mis-computes bfloat16 tl.dot (checked on the GPU)")
    args = inputs(2, 29, 6, 10, 2, 12, dtype=dtype, seed=3)
    y, final = K.ssd_chunked(*args[:5], 16, args[5], "rank_major", config=(16, 16, 4, K.DOT_LOW))
    yr, fr = reference(*args[:5], 16, args[5], "rank_major")
    close(y, yr, tol)
    close(final, fr, tol)


def test_scan_strided_inputs_and_split_sequence():
    """Views with odd strides (as sliced from in_proj) and a prefill split in two equal one scan."""
    b, l, h, p, g, n = 2, 41, 6, 10, 3, 8
    x, dt, A, B, C, s0 = inputs(b, l, h, p, g, n, seed=7)
    big = torch.randn(b, l, 2 * g, n + 3, device=DEV)  # B and C as non-contiguous views
    B, C = big[..., :n].chunk(2, dim=2)
    x = torch.cat([x, torch.zeros_like(x)], dim=-1)[..., :p]
    y, final = K.ssd_chunked(x, dt, A, B, C, 16, s0, "group_contiguous")
    y1, s1 = K.ssd_chunked(x[:, :19], dt[:, :19], A, B[:, :19], C[:, :19], 16, s0, "group_contiguous")
    y2, s2 = K.ssd_chunked(x[:, 19:], dt[:, 19:], A, B[:, 19:], C[:, 19:], 16, s1, "group_contiguous")
    yr, fr = reference(x, dt, A, B, C, 16, s0, "group_contiguous")
    close(y, yr, TOL[torch.float32])
    close(torch.cat([y1, y2], dim=1), yr, TOL[torch.float32])
    close(s2, fr, TOL[torch.float32])


@pytest.mark.parametrize("order", ["group_contiguous", "rank_major"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_matches_reference(order, dtype):
    b, h, p, g, n = 3, 6, 10, 3, 12
    x, dt, A, B, C, s0 = inputs(b, 1, h, p, g, n, dtype=dtype, seed=11)
    x, dt, B, C = x[:, 0], dt[:, 0], B[:, 0], C[:, 0]
    before = s0.clone()
    y, new = K.ssd_step(s0, x, dt, A, B, C, order)
    yr, sr = ssd.ssd_step(*(t.float().cpu() for t in (s0, x, dt, A, B, C)), order)  # float32 reference
    yr, sr = yr.double(), sr.double()
    assert torch.equal(s0, before), "the input state must not change without out_state"
    close(y, yr, 2e-5)
    close(new, sr, 2e-5)
    y2, same = K.ssd_step(s0, x, dt, A, B, C, order, out_state=s0)  # in place
    assert same.data_ptr() == s0.data_ptr()
    close(y2, yr, 2e-5)
    close(s0, sr, 2e-5)


def test_step_chain_equals_scan():
    b, l, h, p, g, n = 2, 9, 4, 6, 2, 8
    x, dt, A, B, C, s0 = inputs(b, l, h, p, g, n, seed=5)
    yr, fr = K.ssd_chunked(x, dt, A, B, C, 16, s0, "rank_major")
    state, ys = s0.clone(), []
    for t in range(l):
        y, state = K.ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], "rank_major", out_state=state)
        ys.append(y)
    close(torch.stack(ys, 1), yr.double().cpu(), 2e-5)
    close(state, fr.double().cpu(), 2e-5)


def test_model_uses_kernels_and_matches_reference():
    """The torch model with the kernels enabled: prefill and cached decode logits are unchanged."""
    model = random_model(seed=2, chunk_size=8, head_order="rank_major").to(DEV)
    ids = torch.randint(0, model.config.vocab_size, (2, 21), device=DEV)
    with torch.no_grad():
        ref_logits = model(ids)
        cache = model.new_cache()
        model(ids[:, :17], cache=cache)
        ref_step = model(ids[:, 17:18], cache=cache)
        calls = []
        orig = K.ssd_chunked
        K.ssd_chunked = lambda *a, **k: calls.append(1) or orig(*a, **k)  # count kernel calls
        try:
            assert enable_triton_kernels((DEV,))
            logits = model(ids)
            cache = model.new_cache()
            model(ids[:, :17], cache=cache)
            step = model(ids[:, 17:18], cache=cache)
        finally:
            K.ssd_chunked = orig
            disable_triton_kernels()
    assert calls, "the scan dispatch did not reach the Triton kernel"
    assert (logits - ref_logits).abs().max().item() < 1e-4
    assert (step - ref_step).abs().max().item() < 1e-4
    assert not ssd._SCAN_KERNELS or all(k.__module__ != "engines.kernels" for k in ssd._SCAN_KERNELS)
