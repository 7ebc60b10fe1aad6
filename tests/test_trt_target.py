"""The `--target trt` path without TensorRT: bf16-compute graphs (what a strongly typed TensorRT
network runs) against the torch model in bf16, profile shapes from the real exported graphs, and the
whole `build --target trt` flow through a stand-in `tensorrt` module."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from elastic_export import plugin_spec, ssd
from elastic_export.onnx_export import export_family, state_specs
from elastic_fixtures import family
from helpers import random_model

BF16, F32 = TensorProto.BFLOAT16, TensorProto.FLOAT


class ssd_scan(OpRun):  # noqa: N801 (the class name is the op_type the reference evaluator matches)
    """The plugin node for onnx's reference evaluator: the torch reference scan (plugin_spec's
    numerics), x/B/C at any dtype, y and final_state float32."""
    op_domain = plugin_spec.ONNX_DOMAIN

    def _run(self, x, dt, A, B, C, initial_state, chunk_size=None, head_order=None, **_parser_attrs):
        order = head_order.decode() if isinstance(head_order, bytes) else head_order
        t = [torch.from_numpy(np.array(a, dtype=np.float32)) for a in (x, dt, A, B, C, initial_state)]
        y, final = ssd.ssd_chunked(*t[:5], int(chunk_size), t[5], order)
        return y.numpy(), final.numpy()


def _bf16_family(tmp_path, mode, seed=0):
    model = random_model(seed, head_order="rank_major").eval()
    budgets = family(model.config, seed, 2)
    mb = model.to(torch.bfloat16)  # what the graphs compute: every parameter rounded to bf16
    export_family(mb, budgets, tmp_path, ssm_op=mode, dtype=torch.bfloat16, compute_dtype=torch.bfloat16)
    return mb, random_model(seed, head_order="rank_major").eval(), budgets


def _types(path):
    """Value name -> element type over the whole graph (inputs, initializers, inferred values)."""
    m = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    t = {v.name: v.type.tensor_type.elem_type for v in [*m.graph.input, *m.graph.value_info, *m.graph.output]}
    t.update({i.name: i.data_type for i in m.graph.initializer})
    return m, t


def test_bf16_compute_graph_types(tmp_path):
    """Matmuls on weights in bf16; RMSNorm statistics, softmax, the scan and the conv in float32;
    SSM state and logits float32, conv and KV states bf16."""
    model, _, budgets = _bf16_family(tmp_path, "decomposed")
    inits = set()
    for name, s in budgets.items():
        for kind in ("prefill", "decode"):
            path = tmp_path / f"{name}.{kind}.onnx"
            onnx.checker.check_model(str(path), full_check=True)  # types consistent at opset 18
            m, types = _types(path)
            inits = {i.name for i in m.graph.initializer if i.data_location == TensorProto.EXTERNAL}
            for n in m.graph.node:
                ins = [types.get(i) for i in n.input if i]
                if n.op_type == "Gemm" or (n.op_type == "MatMul" and inits & set(n.input)):
                    assert ins == [BF16, BF16], (n.op_type, n.input, ins)
                if n.op_type in ("Softmax", "ReduceMean", "Conv", "Softplus", "Exp", "CumSum"):
                    assert ins[0] == F32, (n.op_type, n.input, ins)
            outs = {o.name: o.type.tensor_type.elem_type for o in m.graph.output}
            assert outs.pop("logits") == F32
            for sp in state_specs(model.config, s, torch.bfloat16):
                assert outs[f"present.{sp.name}"] == (F32 if sp.kind == "ssm" else BF16)
                assert sp.dtype == ("float32" if sp.kind == "ssm" else "bfloat16")


@pytest.mark.parametrize("mode", ["decomposed", "plugin"])
def test_bf16_compute_graphs_match_torch_bf16(tmp_path, mode):
    """Prefill and 3 decode steps of every budget, run by onnx's reference evaluator (bfloat16 through
    ml_dtypes; the plugin node through the torch reference), against the torch model in bf16. The
    tolerance is bf16's: the bf16 torch model itself differs from float32 by ~3% of the logit scale."""
    mb, m32, budgets = _bf16_family(tmp_path, mode)
    cfg = mb.config
    g = torch.Generator().manual_seed(0)
    b, l = 2, 13
    ids = torch.randint(0, cfg.vocab_size, (b, l), generator=g)
    mask = np.ones((b, l), np.int64)
    for name, s in budgets.items():
        pre = ReferenceEvaluator(str(tmp_path / f"{name}.prefill.onnx"), new_ops=[ssd_scan])
        outs = dict(zip(pre.output_names, pre.run(None, {"input_ids": ids.numpy(), "attention_mask": mask})))
        with torch.no_grad():
            cache, c32 = mb.new_cache(), m32.new_cache()
            ref, r32 = mb(ids, subnet=s, cache=cache), m32(ids, subnet=s, cache=c32)
        scale = float(ref.abs().max())
        tol = 0.02 * (1 + scale)
        err, gap = np.abs(outs["logits"] - ref.numpy()).max(), float((ref - r32).abs().max())
        assert err <= tol, f"{name}: prefill bf16 logits differ by {err:.3g} (bf16 vs fp32 torch: {gap:.3g})"
        dec = ReferenceEvaluator(str(tmp_path / f"{name}.decode.onnx"), new_ops=[ssd_scan])
        states = {k: v for k, v in outs.items() if k.startswith("present.")}
        full = mask
        for step in range(3):
            tok = torch.randint(0, cfg.vocab_size, (b, 1), generator=g)
            full = np.concatenate([full, np.ones((b, 1), np.int64)], axis=1)
            feed = {"input_ids": tok.numpy(), "attention_mask": full}
            feed.update({f"past.{sp.name}": states[f"present.{sp.name}"] for sp in state_specs(cfg, s)})
            o = dict(zip(dec.output_names, dec.run(None, feed)))
            with torch.no_grad():
                r = mb(tok, subnet=s, cache=cache)
            err = np.abs(o["logits"] - r.numpy()).max()
            assert err <= tol, f"{name}: decode step {step} bf16 logits differ by {err:.3g}"
            states = {k: v for k, v in o.items() if k.startswith("present.")}


# ---- profile shapes from the real exported graphs -------------------------------------------------

def test_profile_shapes_of_the_exported_graphs(tmp_path):
    """Every input of the exporter's prefill and decode graphs gets (min, opt, max) from its dim names;
    in decode the mask's `total` is the KV `past` + 1 at min, opt and max."""
    from engines.trt import builder

    model = random_model(1, head_order="rank_major").eval()
    budgets = family(model.config, 1, 2)
    export_family(model, budgets, tmp_path, ssm_op="decomposed")
    for name, s in budgets.items():
        for kind in ("prefill", "decode"):
            path = tmp_path / f"{name}.{kind}.onnx"
            inputs = builder.onnx_input_dims(path)
            shapes = builder.profile_shapes(path, builder.PROFILES[kind])
            assert set(shapes) == set(inputs)  # every input, no weight among them
            mn, opt, mx = shapes["attention_mask"]
            if kind == "prefill":
                assert set(inputs) == {"input_ids", "attention_mask"}
                assert shapes["input_ids"] == shapes["attention_mask"] and mx == (8, 4096) and mn == (1, 1)
                continue
            assert shapes["input_ids"] == ((1, 1), (1, 1), (8, 1))
            keys = [n for n in inputs if n.endswith(".key")]
            assert keys, "the tiny model has an attention layer"
            for k in keys:
                for m_, kv in zip((mn, opt, mx), shapes[k]):
                    assert m_[1] == kv[2] + 1, (k, m_, kv)
            assert mx[1] == 4096 and mn[1] == 2
            for sp in state_specs(model.config, s):
                want = [d if isinstance(d, int) else None for d in sp.shape]
                for ext in shapes[f"past.{sp.name}"]:
                    assert all(w is None or w == e for w, e in zip(want, ext))


def test_unknown_dim_name_is_an_error(tmp_path):
    from engines.trt import builder

    model = random_model(1, head_order="rank_major").eval()
    export_family(model, family(model.config, 1, 1), tmp_path, ssm_op="decomposed")
    dims = dict(builder.DECODE_DIMS)
    del dims["total"]  # `total` is never taken for `past`: they differ by one
    with pytest.raises(ValueError, match="'total'"):
        builder.profile_shapes(tmp_path / "full.decode.onnx", dims)
