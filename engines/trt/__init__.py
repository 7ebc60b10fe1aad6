"""TensorRT target: the SSD-scan plugin, the engine builder and the TensorRT engine runtime.

Nothing here imports tensorrt at import time. ``availability()`` says whether this machine can
build and run TensorRT engines with our plugin, and if not, names what is missing; ``require()``
raises the same as an ElasticExportError, so ``build --target trt`` stops before writing anything.
"""

from __future__ import annotations

from elastic_export.errors import ElasticExportError

MIN_TRT_FOR_PLUGIN = (10, 7)


class TrtUnavailable(ElasticExportError):
    """TensorRT, its Python plugin module or a CUDA GPU is missing."""


def _version(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def availability(need_gpu: bool = True) -> tuple[bool, str]:
    """(ok, reason). Checks, in order: the tensorrt package, its version and ``tensorrt.plugin``
    (TensorRT >= 10.7), triton (the plugin's kernels), and a CUDA GPU for torch."""
    try:
        import tensorrt as trt
    except Exception as e:
        return False, (f"TensorRT's Python package is not importable ({type(e).__name__}: {e}); install "
                       "TensorRT >= 10.7 from NVIDIA (PyPI's tensorrt wheels fetch the libraries from "
                       "NVIDIA's index)")
    version = getattr(trt, "__version__", "0")
    if _version(version) < MIN_TRT_FOR_PLUGIN:
        return False, (f"TensorRT {version} has no tensorrt.plugin (needs >= 10.7, e.g. JetPack 6 ships 10.3); "
                       "build with --ssm-op decomposed instead")
    try:
        import tensorrt.plugin  # noqa: F401
    except Exception as e:
        return False, (f"TensorRT {version} is installed but tensorrt.plugin does not import "
                       f"({type(e).__name__}: {e}); build with --ssm-op decomposed instead")
    try:
        import triton  # noqa: F401
    except Exception as e:
        return False, f"triton is not importable ({type(e).__name__}: {e}); pip install triton"
    if need_gpu:
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA GPU is visible to torch (TensorRT engines are built and run on a GPU)"
    return True, f"TensorRT {version}"


def require(need_gpu: bool = True) -> str:
    """Raise TrtUnavailable naming what is missing; return a description of TensorRT when fine."""
    ok, reason = availability(need_gpu)
    if not ok:
        raise TrtUnavailable(reason, field="--target trt", fix="use --target onnx or --target auto")
    return reason
