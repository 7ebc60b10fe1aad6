"""ONNX graphs of every budget and SSM mode against the torch elastic forward (float32)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from elastic_export.errors import ConfigError
from elastic_export.onnx_export import budget_graph, check_opset, export_family, state_specs
from elastic_export.onnx_graph import WeightFile
from elastic_export import plugin_spec
from elastic_fixtures import family
from helpers import random_model

ort = pytest.importorskip("onnxruntime")
TOL = 1e-4


def _session(path, **kw):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], **kw)


def _export(tmp_path, seed, mode, n=3, **cfg):
    model = random_model(seed, head_order="rank_major", **cfg).eval()
    budgets = family(model.config, seed, n)
    export_family(model, budgets, tmp_path, ssm_op=mode)
    return model, budgets


def _check(model, budgets, tmp_path, steps, padded=False, b=2, l=37, session=_session):
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (b, l), generator=g)
    mask = torch.ones(b, l, dtype=torch.long)
    if padded:
        mask[0, :5] = 0
    for name, s in budgets.items():
        with torch.no_grad():
            cache = model.new_cache()
            ref = model(ids, subnet=s, cache=cache, attention_mask=mask if padded else None)
        pre = session(tmp_path / f"{name}.prefill.onnx")
        outs = dict(zip([o.name for o in pre.get_outputs()],
                        pre.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})))
        err = np.abs(outs["logits"] - ref.numpy())
        if padded:
            err = err[mask.bool().numpy()]  # padded positions' logits are unused
        assert err.max() <= TOL, f"{name}: prefill logits differ by {err.max():.2e}"
        dec = session(tmp_path / f"{name}.decode.onnx")
        names = [o.name for o in dec.get_outputs()]
        states = {k: v for k, v in outs.items() if k.startswith("present.")}
        full_mask = mask.numpy()
        for step in range(steps):
            tok = torch.randint(0, cfg.vocab_size, (b, 1), generator=g)
            full_mask = np.concatenate([full_mask, np.ones((b, 1), np.int64)], axis=1)
            feed = {"input_ids": tok.numpy(), "attention_mask": full_mask}
            feed.update({f"past.{sp.name}": states[f"present.{sp.name}"] for sp in state_specs(cfg, s)})
            o = dict(zip(names, dec.run(None, feed)))
            with torch.no_grad():
                r = model(tok, subnet=s, cache=cache)
            e = np.abs(o["logits"] - r.numpy()).max()
            assert e <= TOL, f"{name}: decode step {step} logits differ by {e:.2e}"
            states = {k: v for k, v in o.items() if k.startswith("present.")}


@pytest.mark.parametrize("mode", ["standard", "decomposed"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prefill_and_decode_match_torch(tmp_path, mode, seed):
    model, budgets = _export(tmp_path, seed, mode)
    _check(model, budgets, tmp_path, steps=4, padded=seed == 1)


def test_32_decode_steps_standard_and_decomposed(tmp_path):
    for mode in ("standard", "decomposed"):
        d = tmp_path / mode
        d.mkdir()
        model, budgets = _export(d, 3, mode, n=2)
        _check(model, budgets, d, steps=32, b=1, l=20)


def test_plugin_node_runs_as_the_torch_reference(tmp_path):
    """`plugin` graphs hold the node of plugin_spec (prefill and decode) and, run with the plugin's
    ONNX Runtime stand-in (engines.trt.ort_op: the torch reference behind the node), match torch."""
    ort_op = pytest.importorskip("engines.trt.ort_op")
    ok, why = ort_op.available()
    if not ok:
        pytest.skip(why)
    model, budgets = _export(tmp_path, 4, "plugin", n=2)
    for name in budgets:
        for kind in ("prefill", "decode"):
            m = onnx.load(str(tmp_path / f"{name}.{kind}.onnx"), load_external_data=False)
            nodes = [n for n in m.graph.node if n.op_type == plugin_spec.PLUGIN_NAME]
            assert nodes and all(n.domain == plugin_spec.ONNX_DOMAIN for n in nodes)
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
            assert attrs["plugin_namespace"] == plugin_spec.PLUGIN_NAMESPACE.encode()
            assert attrs["head_order"] == b"rank_major" and attrs["chunk_size"] == model.config.chunk_size

    def session(path):
        so = ort_op.session_options()
        so.log_severity_level = 3
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    _check(model, budgets, tmp_path, steps=3, b=2, l=21, session=session)


def test_weights_are_row_ranges_never_sliced_in_graph(tmp_path):
    """Every weight a graph reads is an external row range fed straight to its consumer: no Slice,
    Transpose or Reshape of a weight (those would copy per call or per session)."""
    model, budgets = _export(tmp_path, 5, "standard", n=3)
    wf = WeightFile(model, torch.float32)
    for name in budgets:
        for kind in ("prefill", "decode"):
            m = onnx.load(str(tmp_path / f"{name}.{kind}.onnx"), load_external_data=False)
            ext = {t.name for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
            assert ext
            for t in m.graph.initializer:
                if t.name in ext:
                    kv = {e.key: e.value for e in t.external_data}
                    assert kv["location"] == "weights.bin" and int(kv["offset"]) + int(kv["length"]) <= wf.nbytes
            for n in m.graph.node:
                if ext & set(n.input):
                    assert n.op_type in ("Gemm", "MatMul", "Gather", "Mul"), (n.op_type, n.input)


def test_opset_checks():
    assert check_opset("standard", None) == 27
    assert check_opset("decomposed", None) == 18
    with pytest.raises(ConfigError, match="opset 18 is not supported by --ssm-op standard"):
        check_opset("standard", 18)
    with pytest.raises(ConfigError, match="unknown SSM op"):
        check_opset("scan", None)


def test_budget_graph_refuses_bad_subnet():
    from elastic_export.elastic import Subnet
    from elastic_export.errors import BudgetError

    model = random_model(0, head_order="rank_major")
    wf = WeightFile(model, torch.float32)
    bad = Subnet(model.config.hidden_size + 1, family(model.config)["full"].layers)
    with pytest.raises(BudgetError):
        budget_graph(model, bad, wf, "prefill")


@pytest.mark.parametrize("mode", ["standard", "decomposed"])
def test_group_contiguous_parent(tmp_path, mode):
    """An HF-ordered (group-contiguous) parent exports too: its full budget and a depth/FFN budget."""
    from elastic_export.elastic import LayerWidths, Subnet, full_subnet

    model = random_model(2, head_order="group_contiguous").eval()
    full = full_subnet(model.config)
    shallow = Subnet(full.hidden, tuple(LayerWidths(**{**w.__dict__, "kept": i % 2 == 0,
                                                       "ffn": w.ffn and max(1, w.ffn // 2)})
                                        for i, w in enumerate(full.layers)))
    budgets = {"full": full, "shallow": shallow}
    export_family(model, budgets, tmp_path, ssm_op=mode)
    _check(model, budgets, tmp_path, steps=3, b=2, l=19, padded=True)


@pytest.mark.parametrize("mode", ["standard", "decomposed"])
def test_projection_biases(tmp_path, mode):
    model, budgets = _export(tmp_path, 4, mode, n=3, use_bias=True, mlp_bias=True)
    _check(model, budgets, tmp_path, steps=2, b=2, l=11)
