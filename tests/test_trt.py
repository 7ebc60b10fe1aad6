"""TensorRT target. Without TensorRT: availability messages, profile shapes from ONNX dim names, state
pairing, the AOT PTX (compiled for sm_90 without a GPU) and the plugin definitions run against a
stand-in of tensorrt.plugin that records what they return. With TensorRT and a GPU: a one-node
plugin engine (JIT and AOT) matches the torch reference."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from elastic_export import plugin_spec as spec
from elastic_export import ssd

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

import engines.trt as etrt  # noqa: E402
from engines.trt import builder  # noqa: E402
from engines.trt.engine import state_pairs  # noqa: E402


def test_availability_names_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    ok, reason = etrt.availability()
    assert not ok and "TensorRT" in reason and "not importable" in reason
    with pytest.raises(etrt.TrtUnavailable, match="--target"):
        etrt.require()


def test_availability_old_tensorrt_without_plugin_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    ok, reason = etrt.availability(need_gpu=False)
    assert not ok and "10.3.0" in reason and "decomposed" in reason
    assert etrt.availability(need_gpu=False, need_plugin=False) == (True, "TensorRT 10.3.0")
    mode, note = etrt.ssm_op_for_trt("plugin")
    assert mode == "decomposed" and "10.3.0" in note
    assert etrt.ssm_op_for_trt("decomposed") == ("decomposed", None)


def _graph_with_dims(tmp_path):
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    past = helper.make_tensor_value_info("past_ssm.0", TensorProto.FLOAT, ["batch", 6, 10, 12])
    kv = helper.make_tensor_value_info("past_key.2", TensorProto.FLOAT, ["batch", 2, "past", 16])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 7])
    node = helper.make_node("Identity", ["input_ids"], ["logits"])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(helper.make_graph([node], "g", [ids, past, kv], [out])), path)
    return path


def test_profile_shapes_resolve_dims_by_name(tmp_path):
    path = _graph_with_dims(tmp_path)
    shapes = builder.profile_shapes(path, builder.DECODE_DIMS)
    assert shapes["input_ids"] == ((1, 1), (1, 1), (8, 1))
    assert shapes["past_ssm.0"] == ((1, 6, 10, 12), (1, 6, 10, 12), (8, 6, 10, 12))
    assert shapes["past_key.2"] == ((1, 2, 1, 16), (1, 2, 255, 16), (8, 2, 4095, 16))
    prefill = builder.profile_shapes(path, builder.PREFILL_DIMS)
    assert prefill["past_key.2"][2] == (8, 2, 0, 16) and prefill["input_ids"][2] == (8, 4096)
    with pytest.raises(ValueError, match="'past'"):
        builder.profile_shapes(path, {"batch": (1, 1, 2), "seq": (1, 1, 1)})


def test_state_pairs():
    pairs = state_pairs(["input_ids", "past_ssm.0", "past.key.2"], ["logits", "present_ssm.0", "present.key.2"])
    assert pairs == {"past_ssm.0": "present_ssm.0", "past.key.2": "present.key.2"}
    with pytest.raises(ValueError, match="present_conv"):
        state_pairs(["past_conv"], ["logits"])


# ---- AOT PTX without a GPU ---------------------------------------------------------------------

triton = pytest.importorskip("triton")


_AOT_SNIPPET = """
import json, re, sys
from triton.backends.compiler import GPUTarget
from engines.trt.aot import MAX_STATIC_SHARED, compile_scan
dtype, p, n, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ck = compile_scan(dtype, p, n, chunk, "rank_major", target=GPUTarget("cuda", 90, 32))
entry = re.search(r"\\.entry\\s+" + ck.name + r"\\s*\\((.*?)\\)", ck.ptx, flags=re.S).group(1)
print(json.dumps(dict(params=entry.count(".param"), n_params=ck.n_params, shared=ck.shared, limit=MAX_STATIC_SHARED,
                      warps=ck.num_warps, block_p=ck.block_p, block_n=ck.block_n, name=ck.name)))
"""


@pytest.mark.parametrize("dtype,p,n,chunk", [("bfloat16", 80, 128, 128), ("float32", 6, 12, 16)])
def test_aot_ptx_has_exactly_the_parameters_tensorrt_passes(dtype, p, n, chunk):
    """Compiled in a subprocess: the AOT path needs compiled (not interpreted) Triton functions."""
    import json
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(root), TRITON_DEFAULT_FP_FUSION="1")
    r = subprocess.run([sys.executable, "-c", _AOT_SNIPPET, dtype, str(p), str(n), str(chunk)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = json.loads(r.stdout.strip().splitlines()[-1])
    assert ck["params"] == ck["n_params"] == 6 + 24 + 2  # inputs, scalars, outputs
    assert ck["shared"] <= ck["limit"] and ck["warps"] in (4, 8)
    assert ck["block_p"] == 16 and ck["block_n"] == max(16, 1 << (n - 1).bit_length())


def test_strip_refuses_a_hidden_parameter_that_is_read():
    from engines.trt.aot import strip_unused_params

    ptx = ".entry k(\n\t.param .u64 k_param_0,\n\t.param .u64 k_param_1\n)\n{\n\tld.param.b64 %rd1, [k_param_1];\n}"
    with pytest.raises(ValueError, match="k_param_1"):
        strip_unused_params(ptx, "k", 1)
    ok = ptx.replace("[k_param_1]", "[k_param_0]")
    assert strip_unused_params(ok, "k", 1).count(".param .u64") == 1


# ---- the plugin definitions against a stand-in of tensorrt.plugin -------------------------------

class _Expr:
    """A symbolic dim: a name or a constant, with the arithmetic the plugin uses."""

    def __init__(self, v):
        self.v = v

    is_constant = property(lambda self: isinstance(self.v, int))
    def constant_value(self):
        return self.v

    def _op(self, o, sym, fn):
        o = o.v if isinstance(o, _Expr) else o
        if isinstance(self.v, int) and isinstance(o, int):
            return _Expr(fn(self.v, o))
        return _Expr(f"({self.v}{sym}{o})")

    def __mul__(self, o):
        return self._op(o, "*", lambda a, b: a * b)

    __rmul__ = __mul__


def _stub_tensorrt(monkeypatch):
    reg = {}
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.13.0"
    trt.float32, trt.float16, trt.bfloat16 = "f32", "f16", "bf16"
    trtp = types.ModuleType("tensorrt.plugin")

    def deco(kind):
        return lambda pid: (lambda fn: reg.setdefault((kind, pid), fn))

    for kind in ("register", "autotune", "impl", "aot_impl"):
        setattr(trtp, kind, deco(kind))
    trtp.TensorDesc = trtp.Tensor = object
    trtp.from_shape_expr = lambda shape, dtype: types.SimpleNamespace(shape_expr=shape, dtype=dtype)
    trtp.SymInt32 = lambda e: e.v if isinstance(e, _Expr) else e
    trtp.SymIntExprs = type("SymIntExprs", (), {"from_tuple": staticmethod(list)})
    trtp.KernelLaunchParams = types.SimpleNamespace
    trtp.cdiv = lambda a, b: _Expr(-(-a.v // b)) if a.is_constant else _Expr(f"cdiv({a.v},{b})")
    trtp.AutoTuneCombination = lambda *a: a
    trt.plugin = trtp
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    return reg


def test_plugin_definitions_with_a_stand_in(monkeypatch):
    from engines.trt import aot, plugin

    from engines.kernels import ssd_triton as K

    reg = _stub_tensorrt(monkeypatch)
    monkeypatch.setattr(plugin, "_registered", False)

    def fake_compile(dtype, p, n, chunk, order):  # the real one is checked above, in a subprocess
        bp, bn = K.block_p(p), K.block_n(n)
        return aot.CompiledScan("ssd_scan_kernel", ".entry ssd_scan_kernel(\n)", 4, 0, 32, bp, bn, 32)

    monkeypatch.setattr(aot, "compile_scan", fake_compile)
    plugin.register()
    assert {k for k, _ in reg} == {"register", "autotune", "impl", "aot_impl"}
    assert all(pid == spec.PLUGIN_ID for _, pid in reg)
    import inspect
    for kind in ("register", "impl", "aot_impl"):  # tensorrt.plugin reads annotations as objects
        params = inspect.signature(reg[kind, spec.PLUGIN_ID]).parameters
        assert not any(isinstance(p.annotation, str) for p in params.values()), kind
        assert params["x"].annotation is not inspect.Parameter.empty and params["chunk_size"].annotation is int

    b, l, h, p, g, n = _Expr("b"), _Expr("l"), _Expr(6), _Expr(80), _Expr(2), _Expr(128)
    desc = lambda shape, dt="bf16": types.SimpleNamespace(shape_expr=shape, dtype=dt)  # noqa: E731
    x, dt, A = desc([b, l, h, p]), desc([b, l, h], "f32"), desc([h], "f32")
    B = C = desc([b, l, g, n])
    s0 = desc([b, h, p, n], "f32")
    y, final = reg["register", spec.PLUGIN_ID](x, dt, A, B, C, s0, 128, "rank_major")
    assert y.shape_expr == x.shape_expr and y.dtype == final.dtype == "f32"

    name, ptx, launch, extra = reg["aot_impl", spec.PLUGIN_ID](x, dt, A, B, C, s0, 128, "rank_major", (y, final), 0)
    assert name == b"ssd_scan_kernel" and b".entry ssd_scan_kernel" in ptx
    assert len(extra) == 24 and extra[:5] == ["l", 6, 80, 2, 128]
    assert extra[5] == "((l*6)*80)" and extra[-4:] == [6 * 80 * 128, 80 * 128, 128, 1]
    assert launch.grid_x == 5 and launch.grid_y.v == "(b*6)" and launch.block_x in (128, 256)

    with pytest.raises(ValueError, match="static"):
        reg["aot_impl", spec.PLUGIN_ID](desc([b, l, h, _Expr("p")]), dt, A, B, C, s0, 128, "rank_major",
                                        (y, final), 0)


# ---- real TensorRT -----------------------------------------------------------------------------

def _trt_ready():
    ok, reason = etrt.availability()
    return ok, reason


@pytest.mark.gpu
@pytest.mark.parametrize("aot", [False, True])
def test_plugin_engine_matches_reference(tmp_path, aot):
    ok, reason = _trt_ready()
    if not ok:
        pytest.skip(reason)
    from engines.trt.builder import build_engine
    from engines.trt.engine import _Runner

    import tensorrt as trt

    b, l, h, p, g, n = 2, 37, 6, 10, 2, 12
    dims = {"x": ["b", "l", h, p], "dt": ["b", "l", h], "A": [h], "B": ["b", "l", g, n], "C": ["b", "l", g, n],
            "initial_state": ["b", h, p, n], "y": ["b", "l", h, p], "final_state": ["b", h, p, n]}
    node = spec.make_node(spec.INPUTS, spec.OUTPUTS, 16, "rank_major", aot=aot)
    vi = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, dims[name])  # noqa: E731
    graph = helper.make_graph([node], "ssd", [vi(i) for i in spec.INPUTS], [vi(o) for o in spec.OUTPUTS])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(spec.ONNX_DOMAIN, 1)])
    onnx.save(model, tmp_path / "ssd.onnx")
    build_engine(tmp_path / "ssd.onnx", tmp_path / "ssd.engine",
                 {"only": {"b": (1, 2, 4), "l": (1, 37, 64)}}, timing_cache=tmp_path / "t.cache")
    assert (tmp_path / "t.cache").is_file()

    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(b, l, h, p, generator=gen), torch.rand(b, l, h, generator=gen) * 0.5 + 0.02,
            -(torch.rand(h, generator=gen) + 0.3), torch.randn(b, l, g, n, generator=gen),
            torch.randn(b, l, g, n, generator=gen), torch.randn(b, h, p, n, generator=gen)]
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    r = _Runner.__new__(_Runner)  # a runner without the input_ids/past_* naming rules
    r.engine = runtime.deserialize_cuda_engine((tmp_path / "ssd.engine").read_bytes())
    names = [r.engine.get_tensor_name(i) for i in range(r.engine.num_io_tensors)]
    r.inputs = [nm for nm in names if r.engine.get_tensor_mode(nm) == trt.TensorIOMode.INPUT]
    r.outputs = [nm for nm in names if nm not in r.inputs]
    r.contexts = {"only": r.engine.create_execution_context()}
    r.device = torch.device("cuda")
    outs = r.run("only", {nm: t.cuda() for nm, t in zip(spec.INPUTS, args)})
    torch.cuda.synchronize()
    yr, fr = ssd.ssd_chunked(*args[:5], 16, args[5], "rank_major")
    assert (outs["y"].cpu() - yr).abs().max() < 1e-3 * (1 + yr.abs().max())
    assert (outs["final_state"].cpu() - fr).abs().max() < 1e-3 * (1 + fr.abs().max())
