"""Our TensorRT plugin (engines/trt/plugin.py) through NVIDIA's own ``tensorrt.plugin`` package: the
real decorators, validators, schema parsing, plugin creator, plugin classes and autotune combinations
from the ``tensorrt-cu12-bindings`` wheel (a [test] dependency), driven in the order TensorRT's builder
calls them. Only the native module (libnvinfer) is a stand-in (tests/trt_native_standin.py).
What needs a GPU with TensorRT (running the kernels, the ONNX parser) is in docs/tensorrt.md."""

from typing import Tuple

import pytest

from elastic_export import plugin_spec as spec
from trt_native_standin import ExprBuilder, IDimensionExpr, bindings_plugin_dir, bindings_version, tensorrt_plugin

pytestmark = pytest.mark.skipif(bindings_plugin_dir() is None,
                                reason="tensorrt-cu12-bindings is not installed (pip install -e '.[test]')")

INPUTS = ("x", "dt", "A", "B", "C", "initial_state")
RANKS = (4, 3, 1, 4, 4, 4)  # x [b, l, h, p], dt [b, l, h], A [h], B/C [b, l, g, n], initial_state [b, h, p, n]


@pytest.fixture
def trt_plugin(monkeypatch):
    """(stand-in tensorrt, NVIDIA's tensorrt.plugin, its _lib) with our plugin registered through it."""
    from engines.kernels import ssd_triton as K
    from engines.trt import aot, plugin

    def fake_compile(dtype, p, n, chunk, order):  # the real PTX is checked in test_trt.py
        return aot.CompiledScan("ssd_scan_kernel", ".entry ssd_scan_kernel(\n)", 4, 0, 32, K.block_p(p),
                                K.block_n(n), 32)

    monkeypatch.setattr(aot, "compile_scan", fake_compile)
    monkeypatch.setattr(plugin, "_registered", False)
    with tensorrt_plugin() as (trt, trtp):
        plugin.register()
        import tensorrt.plugin._lib as lib

        yield trt, trtp, lib
    monkeypatch.setattr(plugin, "_registered", False)


def test_the_wheel_is_nvidias_and_needs_no_libs_wheel():
    from importlib.metadata import requires

    assert bindings_version() is not None and int(bindings_version().split(".")[0]) >= 10
    assert not any("tensorrt" in r and "libs" in r for r in requires("tensorrt-cu12-bindings") or [])


def test_definitions_pass_nvidias_validation(trt_plugin):
    trt, trtp, lib = trt_plugin
    d = lib.QDP_REGISTRY[spec.PLUGIN_ID]
    assert tuple(d.input_tensor_names) == INPUTS == tuple(spec.INPUTS)
    assert d.input_attrs == {"chunk_size": int, "head_order": str} and d.num_outputs == len(spec.OUTPUTS)
    assert d.impl_attr_names == d.aot_impl_attr_names == ["chunk_size", "head_order"]
    assert d.autotune_func is not None and d.impl_func is not None and d.aot_impl_func is not None
    ns, name = spec.PLUGIN_ID.split("::")
    creator = trt.get_plugin_registry().get_creator(name, "1", ns)  # registered with TensorRT, version "1"
    assert creator is not None and creator.plugin_version == spec.PLUGIN_VERSION


def _instance(trt, trtp, request):
    """The plugin as the ONNX parser / network would create it: NVIDIA's PluginDef call, its creator."""
    import numpy as np

    if bindings_version().startswith("10.") and tuple(int(v) for v in np.__version__.split(".")[:2]) >= (2, 4):
        # TensorRT 10.x's _lib.py reads an int attribute as int(1-element array), which numpy 2.4 refuses
        # (TypeError: only 0-dimensional arrays...); 11.x reads f.data[0]. Seen with 10.16.1.11.
        pytest.xfail("TensorRT 10.x plugin layer + numpy >= 2.4: int attributes fail (docs/tensorrt.md)")
    ns, name = spec.PLUGIN_ID.split("::")
    make = getattr(getattr(trtp.op, ns), name)(*[trt.ITensor() for _ in INPUTS], chunk_size=64,
                                               head_order="rank_major")
    _, _, plg = make(request)
    assert plg.attrs == {"chunk_size": 64, "head_order": "rank_major"}  # through PluginFields and back
    return plg


def _io(trt, T, b="b", l="l", h=6, p=20, g=2, n=16):
    """Input dims (symbolic batch and sequence) and the PluginTensorDescs of inputs and outputs."""
    dims = [(b, l, h, p), (b, l, h), (h,), (b, l, g, n), (b, l, g, n), (b, h, p, n)]
    types = [T, trt.float32, trt.float32, T, T, trt.float32]
    out = [((b, l, h, p), trt.float32), ((b, h, p, n), trt.float32)]
    exprs = [[IDimensionExpr(v) for v in d] for d in dims]
    descs = [trt.DynamicPluginTensorDesc(trt.PluginTensorDesc([-1 if isinstance(v, str) else v for v in d], t,
                                                              trt.TensorFormat.LINEAR))
             for d, t in [*zip(dims, types), *out]]
    return exprs, types, descs


@pytest.mark.parametrize("aot", [False, True])
def test_builder_call_sequence(trt_plugin, aot):
    trt, trtp, lib = trt_plugin
    req = trt.QuickPluginCreationRequest.PREFER_AOT if aot else trt.QuickPluginCreationRequest.PREFER_JIT
    plg = _instance(trt, trtp, req)
    assert type(plg).__name__ == ("_TemplateAOTPlugin" if aot else "_TemplateJITPlugin")
    T = trt.bfloat16
    exprs, types, descs = _io(trt, T)
    assert plg.get_output_data_types(types, RANKS) == [trt.float32, trt.float32]
    y, final = plg.get_output_shapes(exprs, [], ExprBuilder())
    assert [e.value for e in y] == ["b", "l", 6, 20] and [e.value for e in final] == ["b", 6, 20, 16]
    combos = plg.get_supported_format_combinations(descs, len(INPUTS))  # our autotune, NVIDIA's expansion
    rows = [tuple(c.type for c in combos[i:i + 8]) for i in range(0, len(combos), 8)]
    f = trt.float32
    assert sorted(rows, key=str) == sorted([(t, f, f, t, t, f, f, f) for t in (f, trt.float16, T)], key=str)
    assert all(c.format == trt.TensorFormat.LINEAR for c in combos)
    if not aot:
        return
    plg.set_tactic(0)

    class Launch:  # TensorRT's KernelLaunchParams and SymExprSetter on the C++ side
        pass

    class Setter(dict):
        nbSymExprs = 0

    launch, setter = Launch(), Setter()
    plg.get_launch_params(exprs, descs, len(INPUTS), launch, setter, ExprBuilder())  # NVIDIA checks the types
    val = lambda e: e.expr.value  # noqa: E731  (NVIDIA's SymExprImpl around our IDimensionExpr)
    assert val(launch.grid_x) == -(-20 // block_p(20))
    assert val(launch.grid_y) == "(b*6)" and val(launch.block_x) == 4 * 32
    assert setter.nbSymExprs == 24 and [val(setter[i]) for i in range(5)] == ["l", 6, 20, 2, 16]
    assert val(setter[5]) == "((l*6)*20)" and [val(setter[i]) for i in range(20, 24)] == [6 * 20 * 16, 20 * 16, 16, 1]
    assert {setter[i].dtype for i in range(24)} == {trt.PluginArgDataType.INT32}
    name, ptx = plg.get_kernel([d.desc for d in descs[:6]], [d.desc for d in descs[6:]])
    assert name == b"ssd_scan_kernel" and ptx.startswith(b".entry")


def block_p(p: int) -> int:
    from engines.kernels import ssd_triton as K

    return K.block_p(p)


def test_nvidias_validators_reject_broken_definitions(trt_plugin):
    """What the validation catches, on deliberately broken variants of our definitions: each raises in
    NVIDIA's decorator. Our own definitions passing the fixture above is the other half."""
    trt, trtp, lib = trt_plugin

    def fresh(k):
        pid = f"elastic_export_test::broken_{k}"

        @trtp.register(pid)
        def desc(x: trtp.TensorDesc, dt: trtp.TensorDesc, chunk_size: int, head_order: str
                 ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
            return x.like(), dt.like()

        return pid

    pid = fresh(0)
    with pytest.raises(ValueError, match="AutoTuneCombination"):  # the bug NVIDIA's validator found in ours
        @trtp.autotune(pid)
        def tune(x, dt, outputs) -> list:
            return []
    with pytest.raises(ValueError, match="return annotation"):  # the other one: aot_impl must declare it
        @trtp.aot_impl(pid)
        def aot(x: trtp.TensorDesc, dt: trtp.TensorDesc, chunk_size: int, head_order: str,
                outputs: Tuple[trtp.TensorDesc], tactic: int):
            return None
    with pytest.raises(ValueError, match="schema"):  # attributes out of their registered order
        @trtp.impl(pid)
        def impl(x: trtp.Tensor, dt: trtp.Tensor, head_order: str, chunk_size: int,
                 outputs: Tuple[trtp.Tensor], stream: int) -> None:
            pass
    with pytest.raises(ValueError, match="different from the one specified"):  # attribute type changed
        @trtp.impl(fresh(1))
        def impl2(x: trtp.Tensor, dt: trtp.Tensor, chunk_size: float, head_order: str,
                  outputs: Tuple[trtp.Tensor], stream: int) -> None:
            pass
    with pytest.raises((ValueError, TypeError)):  # string annotations (`from __future__ import annotations`)
        @trtp.register("elastic_export_test::broken_2")
        def desc2(x: "trtp.TensorDesc", chunk_size: "int") -> "trtp.TensorDesc":
            return x.like()
    with pytest.raises(ValueError, match="already has a defintion"):  # one registration per id
        from engines.trt import plugin

        plugin._registered = False
        plugin.register()
