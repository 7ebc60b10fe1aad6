"""The SSM-scan plugin contract: one source of truth for the ONNX `plugin` mode, the TensorRT plugin
(engines/trt/plugin.py) and its ONNX Runtime stand-in (engines/trt/ort_op.py).

The node computes the SSD scan of :func:`elastic_export.ssd.ssd_chunked` (numerics defined there):

    inputs   x              [b, l, h, p]   T (float32, float16 or bfloat16)
             dt             [b, l, h]      float32   (after softplus and clamp)
             A              [h]            float32   (negative: -exp(A_log))
             B              [b, l, g, n]   T
             C              [b, l, g, n]   T
             initial_state  [b, h, p, n]   float32   (zeros for a fresh prefill)
    outputs  y              [b, l, h, p]   float32   (no D skip, no z gate: they stay outside)
             final_state    [b, h, p, n]   float32
    attributes  chunk_size (int), head_order (string: group_contiguous | rank_major)

Prefill (any l) and decode (l = 1, the state carried in initial_state) use the same node.

ONNX form, as TensorRT's ONNX parser expects for a plugin: op_type = the plugin name, a string
attribute ``plugin_namespace``, optionally ``plugin_version``, and ``aot`` = 1 to ask for the
ahead-of-time implementation (compiled kernels embedded in the engine). The node's domain is
``ai.onnx.contrib``, the domain onnxruntime-extensions serves Python custom ops from, so the same
graph runs in ONNX Runtime with the torch reference behind the node; TensorRT's parser maps the node
by op_type and plugin_namespace.

For the TorchScript ONNX exporter, :func:`plugin_scan` is an autograd Function whose ``symbolic``
emits this node; :func:`plugin_export_mode` routes the model's scan and decode step through it.
"""

from __future__ import annotations

import contextlib

import torch

from . import ssd

PLUGIN_NAMESPACE = "elastic_export"
PLUGIN_NAME = "ssd_scan"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"  # tensorrt.plugin's "{namespace}::{name}"
PLUGIN_VERSION = "1"
ONNX_DOMAIN = "ai.onnx.contrib"
ONNX_DOMAIN_VERSION = 1
INPUTS = ("x", "dt", "A", "B", "C", "initial_state")
OUTPUTS = ("y", "final_state")
ATTRIBUTES = {"chunk_size": int, "head_order": str}  # the plugin's own attributes
PARSER_ATTRIBUTES = {"plugin_namespace": str, "plugin_version": str, "aot": int}  # read by TensorRT's parser
HEAD_ORDERS = ("group_contiguous", "rank_major")


def check_attributes(chunk_size: int, head_order: str) -> None:
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if head_order not in HEAD_ORDERS:
        raise ValueError(f"head_order must be one of {HEAD_ORDERS}, got {head_order!r}")


def node_attributes(chunk_size: int, head_order: str, aot: bool = True) -> dict:
    """All attributes of the ONNX node (plugin attributes plus those TensorRT's parser reads)."""
    check_attributes(chunk_size, head_order)
    return {"chunk_size": int(chunk_size), "head_order": head_order, "plugin_namespace": PLUGIN_NAMESPACE,
            "plugin_version": PLUGIN_VERSION, "aot": int(bool(aot))}


def make_node(inputs, outputs, chunk_size: int, head_order: str, name: str | None = None, aot: bool = True):
    """An onnx NodeProto of the plugin (for graph builders and rewriters). Add
    ``onnx.helper.make_opsetid(ONNX_DOMAIN, ONNX_DOMAIN_VERSION)`` to the model's opset imports."""
    import onnx

    if len(inputs) != len(INPUTS) or len(outputs) != len(OUTPUTS):
        raise ValueError(f"the plugin takes inputs {INPUTS} and gives outputs {OUTPUTS}")
    return onnx.helper.make_node(PLUGIN_NAME, list(inputs), list(outputs), name=name, domain=ONNX_DOMAIN,
                                 **node_attributes(chunk_size, head_order, aot))


# ---- torch side: the TorchScript exporter emits the node ----------------------------------------

class _PluginScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, initial_state, chunk_size, head_order, aot):
        return ssd.ssd_chunked(x, dt, A, B, C, chunk_size, initial_state, head_order)

    @staticmethod
    def symbolic(g, x, dt, A, B, C, initial_state, chunk_size, head_order, aot):
        y, final = g.op(f"{ONNX_DOMAIN}::{PLUGIN_NAME}", x, dt, A, B, C, initial_state,
                        chunk_size_i=chunk_size, head_order_s=head_order, plugin_namespace_s=PLUGIN_NAMESPACE,
                        plugin_version_s=PLUGIN_VERSION, aot_i=int(aot), outputs=2)
        y.setType(x.type().with_dtype(torch.float32))
        final.setType(initial_state.type().with_dtype(torch.float32))
        return y, final


def plugin_scan(x, dt, A, B, C, chunk_size: int, initial_state, head_order: str, aot: bool = True):
    """The scan as the plugin node: torch reference when run, the plugin node when exported."""
    check_attributes(chunk_size, head_order)
    if initial_state is None:
        initial_state = x.new_zeros(x.shape[0], x.shape[2], x.shape[3], B.shape[-1], dtype=torch.float32)
    return _PluginScan.apply(x, dt.float(), A.float(), B, C, initial_state.float(), chunk_size, head_order, aot)


@contextlib.contextmanager
def plugin_export_mode(aot: bool = True):
    """Inside, the model's SSD scan and decode step are the plugin node (prefill: any l; decode:
    l = 1 with the cached state as initial_state). Use around ``torch.onnx.export(..., dynamo=False,
    custom_opsets={ONNX_DOMAIN: ONNX_DOMAIN_VERSION})``."""
    def scan(x, dt, A, B, C, chunk_size, initial_state, head_order):
        return plugin_scan(x, dt, A, B, C, chunk_size, initial_state, head_order, aot)

    def step(state, x, dt, A, B, C, head_order):  # chunk_size is moot for l = 1; 16 = the kernels' least
        y, new = plugin_scan(x[:, None], dt[:, None], A, B[:, None], C[:, None], 16, state, head_order, aot)
        return y[:, 0], new

    ssd.register_scan_kernel(scan)
    ssd.register_step_kernel(step)
    try:
        yield
    finally:
        ssd.unregister_kernel(scan)
        ssd.unregister_kernel(step)
