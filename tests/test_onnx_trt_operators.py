"""Every node of every `--target trt` graph, per SSM mode and compute dtype, is in the operator support
matrix of TensorRT's ONNX parser (onnx-tensorrt docs/operators.md, shipped as
tests/fixtures/onnx_trt_operators.json with its source and version) for each TensorRT version it holds.

A node passes when its op type is marked supported and its type T is among the matrix's "Supported
Types" for that op. T is the dtype of the node's data input (the first input; Where: its x input),
which is what the matrix's column lists (comparisons output BOOL, Shape outputs INT64, and indices,
shapes and axes inputs are INT64 for every op). Cast and ConstantOfShape are also checked on their
output. The graph's default-domain opset must be in the version's opset range. Our plugin node
(plugin_spec's domain and op type, with its plugin_namespace) is allowed by name: the parser hands it to
the plugin registry. Of the restrictions column, the ones that name an input that must be constant
("`axes` must be an initializer", "`axis` must be a build-time constant", "... resolvable to a
constant") are checked: that input is an initializer or a Constant node's output. The others are not.
"""

import json
import re
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto

from elastic_export import activations, plugin_spec
from elastic_export.onnx_export import export_family
from elastic_fixtures import family
from helpers import random_model

MATRIX = json.loads((Path(__file__).parent / "fixtures" / "onnx_trt_operators.json").read_text())
VERSIONS = MATRIX["versions"]
TYPE_NAMES = {TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
              TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.BOOL: "BOOL",
              TensorProto.UINT8: "UINT8", TensorProto.INT8: "INT8", TensorProto.DOUBLE: "DOUBLE",
              TensorProto.FLOAT8E4M3FN: "FP8", TensorProto.INT4: "INT4"}


def _types(m: onnx.ModelProto) -> dict[str, int]:
    """Value name -> element type. The plugin's outputs are float32 (plugin_spec), which onnx's shape
    inference cannot know: declared first so that it types what follows them."""
    m = onnx.ModelProto.FromString(m.SerializeToString())
    known = {v.name for v in [*m.graph.value_info, *m.graph.output]}
    for n in m.graph.node:
        if n.domain == plugin_spec.ONNX_DOMAIN:
            m.graph.value_info.extend(onnx.helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                                      for o in n.output if o not in known)
    m = onnx.shape_inference.infer_shapes(m)
    g = m.graph
    t = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.value_info, *g.output]}
    t.update({i.name: i.data_type for i in g.initializer})
    return t


CONSTANT_INPUT = re.compile(r"`(\w+)` (?:input )?must be (?:an initializer|a build-time constant|resolvable to a "
                            r"constant|a constant tensor)")


def _constant_inputs(op_type: str, opset: int, restriction: str) -> list[tuple[int, str]]:
    """(index, name) of the inputs the restriction says must be constant, by the op's ONNX schema."""
    names = CONSTANT_INPUT.findall(restriction)
    if not names:
        return []
    schema = [i.name for i in onnx.defs.get_schema(op_type, opset).inputs]
    return [(schema.index(n), n) for n in names if n in schema]


def unsupported(path: Path, version: str) -> list[str]:
    """One line per node (and opset) TensorRT ``version``'s ONNX parser does not support, naming the op."""
    spec = VERSIONS[version]
    m = onnx.load(str(path), load_external_data=False)
    lo, hi = spec["opset"]
    bad = [f"TensorRT {version}: ONNX opset {o.version} is outside its range {lo}..{hi}"
           for o in m.opset_import if o.domain in ("", "ai.onnx") and not lo <= o.version <= hi]
    types = _types(m)
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    constants = {i.name for i in m.graph.initializer} | {o for n in m.graph.node if n.op_type == "Constant"
                                                           for o in n.output}
    for n in m.graph.node:
        if n.domain == plugin_spec.ONNX_DOMAIN and n.op_type == plugin_spec.PLUGIN_NAME:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            if attrs.get("plugin_namespace") != plugin_spec.PLUGIN_NAMESPACE.encode():
                bad.append(f"TensorRT {version}: plugin node {n.name} lacks plugin_namespace "
                           f"{plugin_spec.PLUGIN_NAMESPACE!r}")
            continue
        row = spec["operators"].get(n.op_type)
        if n.domain not in ("", "ai.onnx") or row is None or not row["supported"]:
            bad.append(f"TensorRT {version}: {n.op_type} (node {n.name}) is not supported by its ONNX parser")
            continue
        for i, name in _constant_inputs(n.op_type, opset, row["restrictions"]):
            if i < len(n.input) and n.input[i] and n.input[i] not in constants:
                bad.append(f"TensorRT {version}: {n.op_type} (node {n.name}) needs a constant `{name}` "
                           f"({row['restrictions']})")
        checked = [n.input[1] if n.op_type == "Where" else n.input[0]] if n.input else []
        if n.op_type in ("Cast", "ConstantOfShape"):
            checked.append(n.output[0])
        for value in checked:
            t = TYPE_NAMES.get(types.get(value), f"unknown type of {value!r}")
            if t not in row["types"]:
                bad.append(f"TensorRT {version}: {n.op_type} (node {n.name}) on {t}; the parser supports "
                           f"{', '.join(row['types'])}")
    return bad


def _export(tmp_path, mode, dtype, **overrides):
    model = random_model(0, head_order="rank_major", **overrides).eval().to(dtype)
    export_family(model, family(model.config, 0, 2), tmp_path, ssm_op=mode, dtype=dtype, compute_dtype=dtype)
    graphs = sorted(tmp_path.glob("*.onnx"))
    assert len(graphs) == 4  # prefill and decode of two budgets
    return graphs


# what `build --target trt` writes: SSM mode plugin (or decomposed where tensorrt.plugin is missing),
# compute at the build dtype (engines/trt/target.py)
@pytest.mark.parametrize("mode", ["plugin", "decomposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_trt_graphs_use_only_what_the_parser_supports(tmp_path, mode, dtype):
    graphs = _export(tmp_path, mode, dtype)
    plugin_nodes = 0
    for path in graphs:
        m = onnx.load(str(path), load_external_data=False)
        plugin_nodes += sum(n.op_type == plugin_spec.PLUGIN_NAME for n in m.graph.node)
        for version in VERSIONS:
            assert unsupported(path, version) == [], path.name
    assert (plugin_nodes > 0) == (mode == "plugin")


# each activation a config may name brings its own ONNX nodes (elastic_export/activations.py): all of them,
# two per graph (one in the MLP, one after the Mamba conv)
NAMES = list(activations.NAMES)
PAIRS = list(zip(NAMES[::2], NAMES[1::2] + NAMES[:1]))


@pytest.mark.parametrize("mlp,mamba", PAIRS)
def test_activations_use_only_what_the_parser_supports(tmp_path, mlp, mamba):
    for path in _export(tmp_path, "plugin", torch.bfloat16, mlp_hidden_act=mlp, mamba_hidden_act=mamba):
        for version in VERSIONS:
            assert unsupported(path, version) == [], path.name


def test_a_graph_with_an_op_the_parser_lacks_fails_naming_it(tmp_path):
    """The `standard` SSM mode (ONNX opset 27 LinearAttention + CausalConvWithState, for ONNX Runtime)
    is not a TensorRT graph: every claimed version refuses it, by op name and by opset."""
    path = _export(tmp_path, "standard", torch.float32)[0]
    for version in VERSIONS:
        bad = "\n".join(unsupported(path, version))
        assert "LinearAttention" in bad and "CausalConvWithState" in bad and "opset 27" in bad, version
    # and a BF16 op the matrix does not list for BF16 (NonZero: FP32/FP16 only)
    g = onnx.helper
    node = g.make_node("NonZero", ["x"], ["y"], name="nz")
    m = g.make_model(g.make_graph([node], "g", [g.make_tensor_value_info("x", TensorProto.BFLOAT16, [3])],
                                  [g.make_tensor_value_info("y", TensorProto.INT64, [1, None])]),
                     opset_imports=[g.make_opsetid("", 18)])
    onnx.save(m, tmp_path / "nz.onnx")
    assert all("NonZero (node nz) on BF16" in unsupported(tmp_path / "nz.onnx", v)[0] for v in VERSIONS)


def test_standard_mode_is_refused_for_tensorrt():
    import engines.trt as etrt
    from elastic_export.errors import ElasticExportError

    with pytest.raises(ElasticExportError, match="LinearAttention"):
        etrt.ssm_op_for_trt("standard")


def test_the_matrix_names_its_sources():
    for version, spec in VERSIONS.items():
        src = spec["source"]
        assert src["repository"] == "onnx/onnx-tensorrt" and src["path"] == "docs/operators.md"
        assert len(spec["operators"]) > 150 and spec["opset"][0] == 9
    assert VERSIONS["10.1"]["source"]["commit"] == "96e781103cfc4adf4a6bb557e94bac8e693f6f4c"


# MoE layers (onnx_moe, dense form): routing in float32 (Sigmoid, TopK, ReduceSum, ScatterElements, Where,
# GatherElements, ConstantOfShape) and the experts' Gemm / batched MatMul, in tiny MoE hybrids with one and
# two routing groups
@pytest.mark.parametrize("moe", [dict(n_routed_experts=8, num_experts_per_tok=3, n_group=2, topk_group=1),
                                 dict(n_routed_experts=5, num_experts_per_tok=2, n_group=1, topk_group=1,
                                      moe_latent_size=20)], ids=["groups", "latent"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_moe_graphs_use_only_what_the_parser_supports(tmp_path, moe, dtype):
    from elastic_export.model import build_model
    from helpers import randomize, tiny_moe_config

    cfg = tiny_moe_config(0, head_order="rank_major", **moe)
    model = randomize(build_model(cfg, seed=0), 0).eval().to(dtype)
    export_family(model, family(cfg, 0, 2), tmp_path, ssm_op="decomposed", dtype=dtype, compute_dtype=dtype)
    # (moe_form auto: dense experts in prefill graphs, gathered ones in decode graphs)
    ops = set()
    for path in sorted(tmp_path.glob("*.onnx")):
        ops |= {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
        for version in VERSIONS:
            assert unsupported(path, version) == [], path.name
    assert {"TopK", "ScatterElements", "GatherElements", "Sigmoid", "Gather"} <= ops
