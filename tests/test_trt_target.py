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


# ---- `build --target trt` through a stand-in tensorrt ---------------------------------------------

class FakeTRT:
    """A stand-in ``tensorrt`` module that records what the builder asks for and "builds" engines
    that run their ONNX graph in ONNX Runtime (on CPU memory, through the addresses TrtEngine binds),
    checking every bound shape against the engine's optimization profile."""

    def __init__(self, version: str, with_plugin: bool):
        import ctypes
        import json
        import types

        fake = self
        self.calls = {"flags": [], "parsed": [], "profiles": [], "cache_in": [], "cache_out": []}
        self.root = None  # directory of the built engines, set by the test before running them
        import importlib.machinery

        m = types.ModuleType("tensorrt")
        m.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # torch._dynamo looks modules up
        m.__version__ = version
        for n in ("float32", "float16", "bfloat16", "int32", "int64", "int8", "bool"):
            setattr(m, n, f"trt.{n}")
        elem = {TensorProto.FLOAT: m.float32, TensorProto.BFLOAT16: m.bfloat16, TensorProto.INT64: m.int64}
        np_of = {m.float32: np.float32, m.int64: np.int64}
        m.Logger = type("Logger", (), {"WARNING": 2, "VERBOSE": 4, "INFO": 3, "__init__": lambda s, lvl=2: None})
        m.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
        m.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
        m.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, mn, opt, mx):
                self.shapes[name] = (tuple(mn), tuple(opt), tuple(mx))

        class Cache:
            def __init__(self, blob):
                self.blob = blob

            def serialize(self):
                return self.blob + b"+"  # one more build's timings

        class Config:
            def __init__(self):
                self.profiles, self.cache = [], None

            def set_memory_pool_limit(self, *a):
                pass

            def add_optimization_profile(self, p):
                self.profiles.append(p.shapes)

            def create_timing_cache(self, blob):
                fake.calls["cache_in"].append(bytes(blob))
                return Cache(bytes(blob) or b"cache")

            def set_timing_cache(self, cache, ignore_mismatch=False):
                self.cache = cache

            def get_timing_cache(self):
                fake.calls["cache_out"].append(self.cache.serialize())
                return self.cache

        class Network:
            onnx = None

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.calls["flags"].append(flags)
                return Network()

            create_builder_config = staticmethod(Config)
            create_optimization_profile = staticmethod(Profile)

            def build_serialized_network(self, network, config):
                fake.calls["profiles"].append((network.onnx, config.profiles))
                return json.dumps({"onnx": network.onnx, "profiles": config.profiles}).encode()

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                self.network = network

            def parse_from_file(self, path):
                from pathlib import Path

                fake.calls["parsed"].append(Path(path).name)
                self.network.onnx = Path(path).name
                return True

        class Context:
            def __init__(self, engine):
                self.e, self.shapes, self.addr, self.results = engine, {}, {}, None

            def set_optimization_profile_async(self, i, stream):
                assert i == 0

            def set_input_shape(self, name, shape):
                mn, _, mx = self.e.profile[name]
                assert all(a <= s <= b for a, s, b in zip(mn, shape, mx)), (name, shape, mn, mx)
                self.shapes[name] = tuple(shape)
                self.results = None

            def set_tensor_address(self, name, ptr):
                self.addr[name] = ptr

            def _run(self):
                feeds = {}
                for name in self.e.inputs:
                    dt = np.dtype(np_of[self.e.dtypes[name]])
                    n = int(np.prod(self.shapes[name])) * dt.itemsize
                    raw = (ctypes.c_char * max(n, 1)).from_address(self.addr[name])
                    feeds[name] = np.frombuffer(raw, dt, count=n // dt.itemsize).reshape(self.shapes[name]).copy()
                self.results = dict(zip(self.e.outputs, self.e.sess.run(self.e.outputs, feeds)))

            def get_tensor_shape(self, name):
                if self.results is None:
                    self._run()
                return self.results[name].shape

            def execute_async_v3(self, stream):
                for name, arr in self.results.items():
                    arr = np.ascontiguousarray(arr)
                    ctypes.memmove(self.addr[name], arr.ctypes.data, arr.nbytes)
                return True

        class Engine:
            num_optimization_profiles = 1

            def __init__(self, blob):
                from engines.trt import ort_op
                import onnxruntime as ort

                rec = json.loads(blob)
                path = fake.root / rec["onnx"]
                proto = onnx.load(str(path), load_external_data=False)
                inits = {i.name for i in proto.graph.initializer}
                vis = [v for v in proto.graph.input if v.name not in inits] + list(proto.graph.output)
                self.inputs = [v.name for v in proto.graph.input if v.name not in inits]
                self.outputs = [v.name for v in proto.graph.output]
                self.names = self.inputs + self.outputs
                self.dtypes = {v.name: elem[v.type.tensor_type.elem_type] for v in vis}
                self.dims = {v.name: [d.dim_value if d.HasField("dim_value") else -1
                                      for d in v.type.tensor_type.shape.dim] for v in vis}
                (self.profile,) = rec["profiles"]
                so = ort_op.session_options(threads=1)
                so.log_severity_level = 3
                self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
                self.num_io_tensors = len(self.names)

            def get_tensor_name(self, i):
                return self.names[i]

            def get_tensor_mode(self, name):
                return m.TensorIOMode.INPUT if name in self.inputs else m.TensorIOMode.OUTPUT

            def get_tensor_dtype(self, name):
                return self.dtypes[name]

            def get_tensor_shape(self, name):
                return self.dims[name]

            def create_execution_context(self):
                return Context(self)

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, blob):
                return Engine(blob)

        m.Builder, m.OnnxParser, m.Runtime = Builder, OnnxParser, Runtime
        self.module = m
        self.plugin = types.ModuleType("tensorrt.plugin") if with_plugin else None
        if self.plugin is not None:
            self.plugin.__spec__ = importlib.machinery.ModuleSpec("tensorrt.plugin", None)

    def install(self, monkeypatch):
        import sys

        from engines.trt import plugin

        monkeypatch.setitem(sys.modules, "tensorrt", self.module)
        monkeypatch.setitem(sys.modules, "tensorrt.plugin", self.plugin)  # None: import fails
        monkeypatch.setattr(plugin, "register", lambda: None)  # the real one is tested in test_trt.py


@pytest.fixture(scope="module")
def nested_ck(tmp_path_factory):
    from elastic_fixtures import save_nested_fixture

    d = tmp_path_factory.mktemp("nested")
    model = random_model(6, head_order="rank_major").eval()
    save_nested_fixture(d / "ck", model, family(model.config, 6, 2))
    return d / "ck", model


def _cli(*args):
    from click.testing import CliRunner

    from elastic_export.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_build_target_trt_through_a_stand_in(nested_ck, tmp_path, monkeypatch):
    """`build --budget all --target trt` with a stand-in TensorRT (10.13, with tensorrt.plugin): the
    plugin-mode graphs are parsed into strongly typed networks with a profile covering every input,
    the timing cache is loaded and saved across engines and builds, the manifests state the engines'
    bytes per budget; then TrtEngine runs the engines (ONNX Runtime behind the stand-in, CPU memory)
    and matches the torch model, prefill and decode, feeding attention_mask as the graphs need."""
    import json

    from engines.trt.engine import TrtEngine

    ck, model = nested_ck
    fake = FakeTRT("10.13.0", with_plugin=True)
    fake.install(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # engines.trt.require() checks it
    cache = tmp_path / "cache" / "timing.cache"
    monkeypatch.setenv("ELASTIC_EXPORT_TRT_TIMING_CACHE", str(cache))
    out = tmp_path / "b"
    r = _cli("build", ck, "--budget", "all", "--target", "trt", "--dtype", "fp32", "--out", out)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "build.json").read_text())
    assert m["target"] == "trt" and m["ssm_op"] == "plugin" and m["compute_dtype"] == "float32"
    assert m["trt_manifest"] == "trt_manifest.json" and (out / "trt_manifest.json").is_file()
    tm = json.loads((out / "trt_manifest.json").read_text())
    budgets = list(m["budgets"])
    assert set(m["trt"]["budget_engine_bytes"]) == set(budgets) == set(tm["budget_engine_bytes"])
    assert m["trt"]["total_engine_bytes"] == sum(m["trt"]["budget_engine_bytes"].values()) > 0
    assert "per budget" in m["trt"]["weights_note"] and m["trt"]["timing_cache"] == str(cache)
    for b in budgets:
        for kind in ("prefill", "decode"):
            f = f"{b}.{kind}.engine"
            assert m["trt"]["engines"][b][kind] == f and f in m["files"] and tm["budgets"][b][kind]["onnx"] == \
                f"{b}.{kind}.onnx"
    assert "trt_manifest.json" in m["files"]
    from elastic_export.build import verify_build
    verify_build(out)

    # the builder's calls: strongly typed networks, one profile per engine covering every graph input
    assert fake.calls["flags"] == [1 << 5] * 2 * len(budgets)
    assert sorted(fake.calls["parsed"]) == sorted(f"{b}.{k}.onnx" for b in budgets for k in ("prefill", "decode"))
    from engines.trt import builder
    for onnx_name, profiles in fake.calls["profiles"]:
        (prof,) = profiles
        assert set(prof) == set(builder.onnx_input_dims(out / onnx_name)), onnx_name
        if onnx_name.endswith(".decode.onnx"):
            key = next(n for n in prof if n.endswith(".key"))
            assert [x[1] for x in prof["attention_mask"]] == [x[2] + 1 for x in prof[key]]
        nodes = onnx.load(str(out / onnx_name), load_external_data=False).graph.node
        assert any(n.op_type == plugin_spec.PLUGIN_NAME for n in nodes)
    # timing cache: the first engine starts empty, every later one loads what the previous one saved
    assert fake.calls["cache_in"][0] == b"" and fake.calls["cache_in"][1:] == fake.calls["cache_out"][:-1]
    assert cache.read_bytes() == fake.calls["cache_out"][-1]

    # TrtEngine over the build: prefill and decode against the torch model
    fake.root = out
    eng = TrtEngine(out, device="cpu")
    assert eng.budgets == budgets
    from elastic_export.build import load_family
    _, fam, _ = load_family(ck)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    for b in budgets:
        eng.set_budget(b)
        with torch.no_grad():
            c = model.new_cache()
            ref = model(ids, subnet=fam[b], cache=c, attention_mask=mask)
            got = eng.prefill(ids, mask)
            assert (got - ref)[mask.bool()].abs().max() <= 1e-4
            for step in range(3):
                tok = torch.randint(0, model.config.vocab_size, (2,), generator=g)
                r = model(tok[:, None], subnet=fam[b], cache=c)[:, -1]
                assert (eng.decode(tok) - r).abs().max() <= 1e-4, (b, step)
                assert eng.mask.shape == (2, 10 + step)

    # a second build (bf16, TensorRT 10.3 without tensorrt.plugin) reuses the machine's timing cache
    old = FakeTRT("10.3.0", with_plugin=False)
    old.install(monkeypatch)
    r = _cli("build", ck, "--budget", budgets[-1], "--target", "trt", "--dtype", "bf16", "--out", tmp_path / "c")
    assert r.exit_code == 0, r.output
    assert "decomposed" in r.output and "10.3.0" in r.output  # says why it is not the plugin
    m2 = json.loads((tmp_path / "c" / "build.json").read_text())
    assert m2["ssm_op"] == "decomposed" and "10.3.0" in m2["ssm_op_note"] and m2["compute_dtype"] == "bfloat16"
    assert old.calls["cache_in"][0] == fake.calls["cache_out"][-1]
    dm, types = _types(tmp_path / "c" / f"{budgets[-1]}.decode.onnx")
    for sp in state_specs(model.config, fam[budgets[-1]]):  # SSM state float32, conv and KV bf16
        assert types[f"past.{sp.name}"] == (F32 if sp.kind == "ssm" else BF16)
    gemm_in = [types[n.input[0]] for n in dm.graph.node if n.op_type == "Gemm"]
    assert gemm_in and set(gemm_in) == {BF16}


def test_build_target_trt_on_this_machine(nested_ck, tmp_path):
    """Without TensorRT (CPU CI): exit 2, one line naming what is missing, nothing written."""
    from engines import trt

    ok, why = trt.availability(need_plugin=False)
    if ok:
        pytest.skip("TensorRT and a GPU are present")
    ck, _ = nested_ck
    before = set(tmp_path.iterdir())
    r = _cli("build", ck, "--budget", "all", "--target", "trt", "--out", tmp_path / "b")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert why in r.output and ("TensorRT" in why or "GPU" in why)
    assert set(tmp_path.iterdir()) == before
