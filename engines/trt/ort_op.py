"""The SSM-scan plugin node run by ONNX Runtime, through onnxruntime-extensions (no TensorRT needed).

A Python custom op registered under the plugin's op_type in onnxruntime-extensions' domain; its
body is the torch reference scan, so a `plugin`-mode graph can be checked on any CPU against the
torch forward. Float32 only (onnxruntime-extensions' Python ops exchange numpy arrays, and numpy
has no bfloat16): the contract's numerics are the same at every dtype.

    so = session_options()              # registers the op once, returns SessionOptions with the library
    sess = onnxruntime.InferenceSession(path, so)
"""

from __future__ import annotations

import numpy as np
import torch

from elastic_export import plugin_spec as spec
from elastic_export import ssd

_registered = False


def available() -> tuple[bool, str]:
    try:
        import onnxruntime  # noqa: F401
        import onnxruntime_extensions  # noqa: F401
    except Exception as e:
        return False, f"onnxruntime-extensions is not importable ({type(e).__name__}: {e}); " \
                      "pip install onnxruntime-extensions"
    return True, "ok"


def _scan(x, dt, A, B, C, initial_state, chunk_size=None, head_order=None, **_parser_attrs):
    """The op body: numpy in, numpy out, the torch reference in between."""
    if chunk_size is None or head_order is None:
        raise ValueError(f"{spec.PLUGIN_NAME} node needs the attributes chunk_size and head_order")
    spec.check_attributes(int(chunk_size), head_order)
    t = [torch.from_numpy(np.ascontiguousarray(a)) for a in (x, dt, A, B, C, initial_state)]
    with torch.no_grad():
        y, final = ssd.ssd_chunked(t[0], t[1], t[2], t[3], t[4], int(chunk_size), t[5], head_order)
    return y.numpy(), final.numpy()


def register() -> None:
    """Register the op with onnxruntime-extensions (idempotent)."""
    global _registered
    if _registered:
        return
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    types = {int: PyCustomOpDef.dt_int64, str: PyCustomOpDef.dt_string}
    attrs = {k: types[v] for k, v in {**spec.ATTRIBUTES, **spec.PARSER_ATTRIBUTES}.items()}
    onnx_op(op_type=spec.PLUGIN_NAME, inputs=[PyCustomOpDef.dt_float] * len(spec.INPUTS),
            outputs=[PyCustomOpDef.dt_float] * len(spec.OUTPUTS), attrs=attrs)(_scan)
    _registered = True


def session_options(threads: int | None = None):
    """onnxruntime.SessionOptions that can run graphs holding the plugin node."""
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    register()
    so = ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return so
