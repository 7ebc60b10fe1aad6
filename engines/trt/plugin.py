"""The SSD-scan TensorRT plugin through ``tensorrt.plugin`` (quickly deployable plugins, TensorRT >= 10.9:
``tensorrt.plugin`` exists from 10.7, its ``aot_impl`` from 10.9; checked against NVIDIA's bindings wheels).

Contract (names, I/O order, attributes): :mod:`elastic_export.plugin_spec`. Three definitions:

- ``register``: output shapes and types. y is x's shape in float32, final_state is initial_state's.
- ``impl`` (JIT): a Python callback at run time; wraps TensorRT's buffers as torch tensors and
  launches the Triton kernel on TensorRT's stream. Needs Python, torch and triton at run time.
- ``aot_impl`` (AOT): the Triton kernel compiled to PTX at build time and embedded in the engine,
  with its grid and scalar arguments as symbolic shape expressions, so the engine runs in a plain
  TensorRT runtime (C++, trtexec) without Python. The ONNX node's ``aot`` attribute picks it.

The Mamba dims (h, p, g, n) must be static in the network (only batch and sequence are dynamic):
the AOT kernel's block sizes are chosen from them at build time.

``register()`` must run before an ONNX graph holding the node is parsed, and (JIT engines only)
before such an engine is deserialized.
"""

# No `from __future__ import annotations` here: tensorrt.plugin reads the decorated functions'
# annotations (TensorDesc = input tensor, anything else = attribute) as objects, not strings, and its
# validators (tensorrt/plugin/_validate.py) insist on some of them: autotune returns
# List[AutoTuneCombination], aot_impl must declare its 4-tuple return. tests/test_trt_plugin_layer.py
# runs these definitions through NVIDIA's own decorators and validators.

from elastic_export import plugin_spec as spec

_registered = False


def _const(expr, what: str) -> int:
    """The value of a build-time constant shape expression (TensorRT ShapeExpr: ``is_constant`` is a
    property, ``constant_value()`` a method)."""
    try:
        constant = bool(expr.is_constant)
    except RuntimeError:  # a "fake" expression outside a shape context
        constant = False
    if not constant:
        raise ValueError(f"{spec.PLUGIN_ID}: {what} must be a static dimension in the network "
                         "(only batch and sequence may be dynamic)")
    value = expr.constant_value
    return int(value() if callable(value) else value)


def _as_torch(t):
    """A torch view (no copy) of a tensorrt.plugin Tensor: DLPack when offered, else the CUDA array
    interface, which has no bfloat16 (read such a buffer as int16 and view it as bfloat16)."""
    import tensorrt as trt
    import torch

    if hasattr(t, "__dlpack__"):
        try:
            return torch.from_dlpack(t)
        except Exception:
            pass
    if t.dtype == trt.bfloat16:
        class _Raw:
            __cuda_array_interface__ = {"shape": tuple(t.shape), "typestr": "<i2", "version": 2,
                                        "data": (int(t.data_ptr), False)}
        return torch.as_tensor(_Raw(), device="cuda").view(torch.bfloat16)
    return torch.as_tensor(t, device="cuda")


def register() -> None:
    """Define the plugin with tensorrt.plugin (idempotent). Raises ImportError without TensorRT."""
    global _registered
    if _registered:
        return
    from typing import List, Tuple, Union

    import tensorrt as trt
    import tensorrt.plugin as trtp

    dtype_names = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16"}

    @trtp.register(spec.PLUGIN_ID)
    def ssd_scan_desc(x: trtp.TensorDesc, dt: trtp.TensorDesc, A: trtp.TensorDesc, B: trtp.TensorDesc,
                      C: trtp.TensorDesc, initial_state: trtp.TensorDesc, chunk_size: int,
                      head_order: str) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        y = trtp.from_shape_expr(x.shape_expr, dtype=trt.float32)  # [b, l, h, p]
        final = trtp.from_shape_expr(initial_state.shape_expr, dtype=trt.float32)  # [b, h, p, n]
        return y, final

    @trtp.autotune(spec.PLUGIN_ID)
    def ssd_scan_autotune(x, dt, A, B, C, initial_state, outputs) -> List[trtp.AutoTuneCombination]:
        # x, B, C share one type T; dt, A, the states and y are float32. Linear formats only.
        # Dependent combinations ('|'), spelled out at every position: (T, FP32, FP32, T, T, FP32, FP32, FP32).
        t, f = "FP32|FP16|BF16", "FP32|FP32|FP32"
        return [trtp.AutoTuneCombination(f"{t}, {f}, {f}, {t}, {t}, {f}, {f}, {f}", "LINEAR")]

    @trtp.impl(spec.PLUGIN_ID)
    def ssd_scan_impl(x: trtp.Tensor, dt: trtp.Tensor, A: trtp.Tensor, B: trtp.Tensor, C: trtp.Tensor,
                      initial_state: trtp.Tensor, chunk_size: int, head_order: str,
                      outputs: Tuple[trtp.Tensor], stream: int) -> None:
        import torch

        from engines.kernels.ssd_triton import ssd_chunked

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            t = [_as_torch(a) for a in (x, dt, A, B, C, initial_state)]
            out = (_as_torch(outputs[0]), _as_torch(outputs[1]))
            ssd_chunked(*t[:5], int(chunk_size), t[5], head_order, out=out)

    @trtp.aot_impl(spec.PLUGIN_ID)
    def ssd_scan_aot_impl(x: trtp.TensorDesc, dt: trtp.TensorDesc, A: trtp.TensorDesc, B: trtp.TensorDesc,
                          C: trtp.TensorDesc, initial_state: trtp.TensorDesc, chunk_size: int, head_order: str,
                          outputs: Tuple[trtp.TensorDesc], tactic: int
                          ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
        from .aot import compile_scan

        spec.check_attributes(int(chunk_size), head_order)
        b, l, h, p = (x.shape_expr[i] for i in range(4))
        g, n = B.shape_expr[2], B.shape_expr[3]
        P = _const(p, "head dim p")
        ck = compile_scan(dtype_names[x.dtype], P, _const(n, "state size n"), int(chunk_size), head_order)
        _const(h, "heads h"), _const(g, "groups g")
        i32 = trtp.SymInt32
        # Scalars in the kernel's order: sizes, then strides of contiguous x, dt, B, C, initial_state.
        scalars = [l, h, p, g, n,
                   l * h * p, h * p, p, 1,          # x [b, l, h, p]
                   l * h, h, 1,                     # dt [b, l, h]
                   l * g * n, g * n, n, 1,          # B [b, l, g, n]
                   l * g * n, g * n, n, 1,          # C
                   h * p * n, p * n, n, 1]          # initial_state [b, h, p, n]
        extra = trtp.SymIntExprs.from_tuple([i32(e) for e in scalars])
        launch = trtp.KernelLaunchParams()
        launch.grid_x = -(-P // ck.block_p)  # head-channel blocks: a build-time constant
        launch.grid_y = b * h
        launch.block_x = ck.num_warps * 32
        launch.shared_mem = ck.shared
        return ck.name.encode(), ck.ptx.encode(), launch, extra

    _registered = True
