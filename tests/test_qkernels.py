"""torch's int4 CPU kernel over the one packed copy of a nested int4 family (elastic_export.qkernels,
qmodel.QView): every budget's rows and columns of the packed tensor against a float64 product of the
codes and scales, and the quantized model on the kernel against its own exact dequantizing path."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import elastic_export as ee
from elastic_export import qcheckpoint as qc
from elastic_export import qkernels, qmodel, quant
from elastic_export.qmodel import QWeight

pytestmark = pytest.mark.skipif(not qkernels.available(), reason="this torch has no int4 CPU kernel it lays out as known")


def _qweight(N, K, block, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g)
    codes, scales = quant.quantize(w, quant.QuantSpec("int4"), block)
    return QWeight(quant.pack_int4(codes), scales, block, True)


def _reference(qw: QWeight, x: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
    """float64: bf16-rounded inputs times the codes times the bf16-rounded scales (the kernel's inputs)."""
    w = quant.unpack_int4(qw.codes).double() * \
        qw.scales.to(torch.bfloat16).double().repeat_interleave(qw.block, -1)
    return x.to(torch.bfloat16).double() @ w[rows, cols].T


def _close(y, ref):
    # the kernel's outputs are bf16 (one rounding per partial product): 2^-7 of the output's scale
    assert y.dtype == torch.float32
    err = (y.double() - ref).abs().max().item()
    assert err <= 2 ** -7 * ref.abs().max().item(), err


@pytest.mark.parametrize("N,K,block", [(131, 96, 32), (192, 256, 64), (70, 384, 128), (100, 512, 256), (97, 160, 16)])
def test_packed_rows_and_columns_of_every_budget(N, K, block):
    qw = _qweight(N, K, block, seed=N + K)
    pk = qkernels.PackedInt4(qw)
    meta = torch.empty(N, K, device="meta")
    g = torch.Generator().manual_seed(1)
    g32 = max(block, 32)
    # (rows, cols): whole, row runs off the tile grid, column prefixes, a column run not at 0, and the
    # whole tensor again once the budgets have cut it into column segments
    cases = [(slice(0, N), slice(0, K)), (slice(37, N - 5), slice(0, K)), (slice(0, N // 2), slice(0, K - g32)),
             (slice(3, 3 + N // 3), slice(g32, K)), (slice(0, 1), slice(0, g32)), (slice(0, N), slice(0, K))]
    for rows, cols in cases:
        view = meta[rows, cols]
        x = torch.randn(5, 3, view.shape[1], generator=g)
        bias = torch.randn(view.shape[0], generator=g)
        y = pk.linear(x, view, bias)
        assert y.shape == (5, 3, view.shape[0])
        _close(y - bias, _reference(qw, x.reshape(15, -1), rows, cols).reshape(5, 3, -1))
    assert pk.nbytes <= (2 if block == 16 else 1) * (-(-N // 64) * 64) * K // 2 * 1.3  # one copy (plus scales)
    assert pk.linear(torch.randn(2, N), meta.T) is None  # not a run of rows of the family tensor
    assert pk.linear(torch.randn(2, 8), meta[:, 8:16]) is None  # cuts a group


def _family(tmp_path):
    """A random nested family whose widths the kernel takes: hidden 160 / 128 / 96, a budget with a
    smaller Mamba head dim (its out_proj blocks are 16, its views per-head column prefixes)."""
    from helpers import randomize, tiny_config
    from elastic_export.model import build_model
    from elastic_export.nested import save_nested
    from elastic_export.search import plan_budgets

    cfg = tiny_config(2, hidden_size=160, mamba_head_dim=32, head_dim=32, intermediate_size=224, mamba_num_heads=6,
                      n_groups=2, num_attention_heads=6, num_key_value_heads=2, head_order="rank_major",
                      tie_word_embeddings=True, vocab_size=291)
    plan = plan_budgets(cfg, ["75%", "50%"], embed_divisor=32, ffn_divisor=32)

    def widths(s, hidden, heads, p, ffn, attn):
        layers = [dataclasses.replace(lw, **{k: v for k, v in dict(mamba_heads=heads, mamba_head_dim=p, ffn=ffn,
                                                                   attn_heads=attn).items()
                                             if getattr(lw, k, None) is not None}) for lw in s.layers]
        return dataclasses.replace(s, hidden=hidden, layers=tuple(layers))

    budgets = {"b1": widths(plan["75pct"], 128, 4, 32, 192, 4), "b2": widths(plan["50pct"], 96, 4, 16, 128, 2)}
    model = randomize(build_model(cfg, seed=3), 3).eval()
    save_nested(tmp_path / "float", model, budgets)
    qc.quantize_nested(tmp_path / "float", tmp_path / "q", quant.QuantSpec("int4"))
    return tmp_path / "q"


def test_quantized_model_on_the_kernel_equals_its_exact_path(tmp_path):
    from engines.torch_engine import TorchEngine

    path = _family(tmp_path)
    fast, exact = ee.load(path), ee.load(path).use_kernels(False)
    bf16 = ee.load(path, dtype=torch.bfloat16).use_kernels(False)  # the exact path, computed in bf16
    assert {q.block for q in fast.qweights.values()} == {16, 32}
    ids = torch.randint(0, fast.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0))
    calls, dense = [], []
    real, real_dense = qkernels.PackedInt4.linear, qmodel.dequantize_view
    qkernels.PackedInt4.linear = lambda self, *a, **k: calls.append(1) or real(self, *a, **k)
    qmodel.dequantize_view = lambda qw, view, *a: dense.append(qw) or real_dense(qw, view, *a)
    try:
        for name, sub in fast.budgets.items():
            dense.clear()
            with torch.no_grad():
                a = fast(ids, subnet=sub)
                assert not dense, f"{name}: {len(dense)} views dequantized on the kernel path"
                b, c = exact(ids, subnet=sub), bf16(ids, subnet=sub).float()
            # bf16 inputs and outputs of every matmul: no further from the float32 path than the whole
            # model computed in bf16 is (measured 1.0-1.2% of the logits' scale against 1.4-2.2%)
            err, err_bf16 = (a - b).abs().max(), (c - b).abs().max()
            assert err <= min(err_bf16, 3e-2 * b.abs().max()), (name, err, err_bf16)
            ef, ee_ = TorchEngine(fast, fast.budgets), TorchEngine(exact, exact.budgets)
            ef.set_budget(name), ee_.set_budget(name)
            dense.clear()
            x = ef.prefill(ids[:1, :9])
            assert not dense, name
            y = ee_.prefill(ids[:1, :9])
            for t in ids[0, 9:15]:  # the decode step's own code path (step constants, fused views)
                dense.clear()
                x = ef.decode(t.view(1))
                assert not dense, name
                y = ee_.decode(t.view(1))
                assert (x - y).abs().max() <= 3e-2 * y.abs().max(), name
    finally:
        qkernels.PackedInt4.linear, qmodel.dequantize_view = real, real_dense
    assert calls
    # every int4 tensor a layer multiplies by was packed (all but the embedding rows' lookups go through it)
    assert set(fast.kernels) == set(fast.qweights)  # tied: the embedding is lm_head
    assert not exact.kernels
    # one packed copy: the packed bytes are the int4 bytes (block-16 tensors twice), padding aside
    q16 = sum(q.codes.numel() for n, q in fast.qweights.items() if q.block == 16)
    codes = sum(q.codes.numel() for q in fast.qweights.values())
    assert sum(p.nbytes for p in fast.kernels.values()) <= 1.6 * (codes + q16)


def test_bf16_compute_takes_the_kernel_too(tmp_path):
    path = _family(tmp_path)
    m, ref = ee.load(path, dtype=torch.bfloat16), ee.load(path).use_kernels(False)
    ids = torch.randint(0, m.config.vocab_size, (1, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = m(ids).float(), ref(ids)
    assert m.kernels and (a - b).abs().max() <= 3e-2 * b.abs().max()


def test_validate_judges_the_quantized_torch_engine(tmp_path):
    """validate FLOAT --build QUANTIZED: the torch engine over the quantized nested checkpoint is a row of
    its own, judged with its format's thresholds; the quantized checkpoint as the source exits 2."""
    import json

    from click.testing import CliRunner

    from elastic_export.cli import main

    q = _family(tmp_path)
    r = CliRunner().invoke(main, ["validate", str(tmp_path / "float"), "--build", str(q), "--backends",
                                  "torch,torch-int4", "--no-memory", "--tasks", "0", "--quiet", "--report",
                                  str(tmp_path / "rep")])
    assert r.exit_code in (0, 1), r.output
    rows = [x for x in json.loads((tmp_path / "rep" / "report.json").read_text())["parity"]
            if x["backend"] == "torch-int4"]
    assert [x["budget"] for x in rows] == ["full", "b1", "b2"] and {x["precision"] for x in rows} == {"int4"}
    assert all(0 < x["metrics"]["ppl_rel_delta"] < 0.5 for x in rows)  # quantized: moved, not broken
    r = CliRunner().invoke(main, ["validate", str(q), "--report", str(tmp_path / "rep2")])
    assert r.exit_code == 2 and "--build" in r.output and "Traceback" not in r.output


# ---- int8: torch's per-channel int8 kernel, block by block ------------------------------------------

def _qweight8(N, K, block, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g)
    codes, scales = quant.quantize(w, quant.QuantSpec("int8"), block)
    return QWeight(codes, scales, block, False)


def _reference8(qw: QWeight, x: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
    w = qw.codes.double() * qw.scales.to(torch.bfloat16).double().repeat_interleave(qw.block, -1)
    return x.to(torch.bfloat16).double() @ w[rows, cols].T


@pytest.mark.skipif(not qkernels.int8_available(), reason="this torch has no int8 CPU kernel")
@pytest.mark.parametrize("N,K,block", [(131, 192, 64), (70, 384, 128), (97, 512, 256)])
def test_int8_rows_and_columns_of_every_budget(N, K, block):
    qw = _qweight8(N, K, block, seed=N + K)
    pk = qkernels.PackedInt8(qw)
    meta = torch.empty(N, K, device="meta")
    g = torch.Generator().manual_seed(1)
    cases = [(slice(0, N), slice(0, K)), (slice(37, N - 5), slice(0, K)), (slice(0, N // 2), slice(0, K - block)),
             (slice(3, 3 + N // 3), slice(block, K)), (slice(0, 1), slice(0, block))]
    for rows, cols in cases:
        view = meta[rows, cols]
        x = torch.randn(2, 3, view.shape[1], generator=g)  # 6 tokens: a decode batch
        bias = torch.randn(view.shape[0], generator=g)
        y = pk.linear(x, view, bias)
        assert y.shape == (2, 3, view.shape[0])
        _close(y - bias, _reference8(qw, x.reshape(6, -1), rows, cols).reshape(2, 3, -1))
    assert pk.nbytes <= N * K * (1 + 6 / block)  # one copy of the codes, plus float32 and bf16 scales
    assert pk.linear(torch.randn(2, N), meta.T) is None  # not a run of rows of the family tensor
    assert pk.linear(torch.randn(2, 8), meta[:, 8:16]) is None  # cuts a block
    # a prompt: dequantized from this copy (codes times float32 scales, as quant.dequantize), float32 GEMM
    x = torch.randn(qkernels.INT8_MAX_ROWS + 1, K // 2 // block * block, generator=g)
    want = x.double() @ quant.dequantize(qw.codes, qw.scales).double()[5:50, :x.shape[1]].T
    got = pk.linear(x, meta[5:50, :x.shape[1]])
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.skipif(not qkernels.int8_available(), reason="this torch has no int8 CPU kernel")
def test_int8_model_on_the_kernel_equals_its_exact_path(tmp_path, monkeypatch):
    """An int8 nested family through the torch engine: decode steps on the int8 kernel (prompts on the
    dequantizing path) within bf16 error of the exact path, no decode-step view dequantized."""
    from engines.torch_engine import TorchEngine

    path = _family(tmp_path)  # int8 blocks 16 and 32 here
    qc.quantize_nested(tmp_path / "float", tmp_path / "q8", quant.QuantSpec("int8"))
    fast, exact = ee.load(tmp_path / "q8"), ee.load(tmp_path / "q8").use_kernels(False)
    assert path.exists() and not any(q.packed for q in fast.qweights.values())
    P = qkernels.INT8_MAX_ROWS + 4  # a prompt longer than the kernel takes
    ids = torch.randint(0, fast.config.vocab_size, (1, P + 6), generator=torch.Generator().manual_seed(0))
    dense, real_dense = [], qmodel.dequantize_view
    monkeypatch.setattr(qmodel, "dequantize_view", lambda qw, view, *a: dense.append(qw) or real_dense(qw, view, *a))
    for name in fast.budgets:
        ef, ex = TorchEngine(fast, fast.budgets), TorchEngine(exact, exact.budgets)
        ef.set_budget(name), ex.set_budget(name)
        x, y = ef.prefill(ids[:, :P]), ex.prefill(ids[:, :P])
        assert (x - y).abs().max() <= 1e-4 * y.abs().max(), name  # prompts: the exact path on both
        for t in ids[0, P:]:
            dense.clear()
            x = ef.decode(t.view(1))
            assert not dense, f"{name}: {len(dense)} views dequantized in a decode step"
            y = ex.decode(t.view(1))
            assert (x - y).abs().max() <= 3e-2 * y.abs().max(), name
    assert fast.kernels and all(isinstance(k, qkernels.PackedInt8) for k in fast.kernels.values())
