"""TensorRT target: the SSD-scan plugin, the engine builder and the TensorRT engine runtime.

Nothing here imports tensorrt at import time. ``availability()`` says whether this machine can
build and run TensorRT engines with our plugin, and if not, names what is missing; ``require()``
raises the same as an ElasticExportError, so ``build --target trt`` stops before writing anything.
"""

from __future__ import annotations

from elastic_export.errors import ElasticExportError

MIN_TRT_FOR_PLUGIN = (10, 9)  # tensorrt.plugin since 10.7, its aot_impl (our AOT kernels) since 10.9


class TrtUnavailable(ElasticExportError):
    """TensorRT, its Python plugin module or a CUDA GPU is missing."""


def _version(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def plugin_support() -> tuple[bool, str]:
    """(ok, reason): whether the installed TensorRT has ``tensorrt.plugin`` with ``aot_impl`` (>= 10.9) and triton is
    there to compile the plugin's kernels. Assumes tensorrt imports."""
    import tensorrt as trt

    version = getattr(trt, "__version__", "0")
    if _version(version) < MIN_TRT_FOR_PLUGIN:
        return False, f"TensorRT {version} has no tensorrt.plugin with aot_impl (needs >= 10.9; JetPack 6 ships 10.3)"
    try:
        import tensorrt.plugin  # noqa: F401
    except Exception as e:
        return False, f"TensorRT {version} is installed but tensorrt.plugin does not import ({type(e).__name__}: {e})"
    try:
        import triton  # noqa: F401
    except Exception as e:
        return False, f"triton is not importable ({type(e).__name__}: {e}); pip install triton"
    return True, f"TensorRT {version} with tensorrt.plugin"


def availability(need_gpu: bool = True, need_plugin: bool = True) -> tuple[bool, str]:
    """(ok, reason). Checks, in order: the tensorrt package, ``tensorrt.plugin`` and triton (when
    ``need_plugin``: the `plugin` SSM mode), and a CUDA GPU for torch."""
    try:
        import tensorrt as trt
    except Exception as e:
        return False, (f"TensorRT's Python package is not importable ({type(e).__name__}: {e}); install "
                       "TensorRT >= 10.9 from NVIDIA (PyPI's tensorrt wheels fetch the libraries from "
                       "NVIDIA's index)")
    version = getattr(trt, "__version__", "0")
    if need_plugin:
        ok, reason = plugin_support()
        if not ok:
            return False, reason + "; build with --ssm-op decomposed instead"
    if need_gpu:
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA GPU is visible to torch (TensorRT engines are built and run on a GPU)"
    return True, f"TensorRT {version}"


def require(need_gpu: bool = True, need_plugin: bool = True) -> str:
    """Raise TrtUnavailable naming what is missing; return a description of TensorRT when fine.
    ``build --target trt`` calls this before it writes anything."""
    ok, reason = availability(need_gpu, need_plugin)
    if not ok:
        raise TrtUnavailable(reason, field="--target trt", fix="use --target onnx or --target auto")
    return reason


def ssm_op_for_trt(requested: str | None = None) -> tuple[str, str | None]:
    """The SSM mode a TensorRT build uses, and a note to print when it is not the one asked for.

    ``plugin`` where tensorrt.plugin exists; otherwise ``decomposed`` (plain ONNX ops TensorRT parses
    natively), saying so. An explicit ``decomposed`` request is kept. ``standard`` is refused: its ops
    are not in TensorRT's ONNX parser (tests/test_onnx_trt_operators.py checks every trt graph against
    the parser's operator matrix).
    """
    if requested == "standard":
        raise TrtUnavailable("the standard SSM mode uses ONNX opset 27's LinearAttention and CausalConvWithState, "
                             "which TensorRT's ONNX parser does not support (opsets up to 24 in 10.15)",
                             field="--ssm-op", fix="use --ssm-op plugin or decomposed with --target trt")
    if requested not in (None, "plugin"):
        return requested, None
    ok, reason = plugin_support()
    if ok:
        return "plugin", None
    return "decomposed", f"{reason}: building the SSM scan in the decomposed mode instead of the plugin"
