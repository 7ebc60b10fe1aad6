"""NVIDIA's real ``tensorrt.plugin`` package (from the ``tensorrt-cu12-bindings`` wheel) over a minimal
stand-in for the one part that needs libnvinfer: the native ``tensorrt`` module.

The wheel installs ``tensorrt_bindings/`` (``tensorrt.so`` + the pure-Python ``plugin/`` package, which
does ``import tensorrt as trt``). Importing ``tensorrt_bindings`` itself would load ``tensorrt.so``, so
the plugin package is loaded from its files as ``tensorrt.plugin`` under a stand-in ``tensorrt``
holding exactly the names its modules use (``grep -oh 'trt\\.[A-Za-z_]*' plugin/*.py``): enums, the
plugin-field types, a plugin registry, and empty base classes for the C++ interfaces it subclasses.
Everything the decorators, validators, schema parsing and autotune combinations do is NVIDIA's code.
"""

from __future__ import annotations

import contextlib
import enum
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np


def bindings_plugin_dir() -> Path | None:
    """The installed wheel's ``plugin/`` directory, without importing the native module; None if absent."""
    spec = importlib.util.find_spec("tensorrt_bindings")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "plugin"
    return d if (d / "_lib.py").is_file() else None


def bindings_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tensorrt-cu12-bindings")
    except PackageNotFoundError:
        return None


def _enum(name: str, members: str) -> type:
    return enum.Enum(name, members.split())


def native_standin(version: str) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__path__ = []  # a package, so that tensorrt.plugin can be a submodule
    trt.__version__ = version
    trt.DataType = _enum("DataType", "FLOAT HALF BF16 INT8 INT32 INT64 BOOL UINT8 FP8 INT4 FP4 E8M0")
    trt.float32, trt.float16, trt.bfloat16 = trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16
    trt.int8, trt.int32, trt.int64 = trt.DataType.INT8, trt.DataType.INT32, trt.DataType.INT64
    trt.TensorFormat = _enum("TensorFormat", "LINEAR CHW2 HWC8 CHW4 CHW16 CHW32 DHWC8 CDHW32 HWC DLA_LINEAR "
                                             "DLA_HWC4 HWC16 DHWC")
    trt.PluginFieldType = _enum("PluginFieldType", "FLOAT16 FLOAT32 FLOAT64 INT8 INT16 INT32 CHAR DIMS UNKNOWN "
                                                   "BF16 INT64 FP8 INT4 FP4")
    trt.DimensionOperation = _enum("DimensionOperation", "SUM PROD MAX MIN SUB EQUAL LESS FLOOR_DIV CEIL_DIV")
    trt.TensorRTPhase = _enum("TensorRTPhase", "BUILD RUNTIME")
    trt.QuickPluginCreationRequest = _enum("QuickPluginCreationRequest", "UNKNOWN PREFER_JIT PREFER_AOT "
                                                                         "STRICT_JIT STRICT_AOT")  # AOT on
    trt.PluginArgType = _enum("PluginArgType", "INT")
    trt.PluginArgDataType = _enum("PluginArgDataType", "INT8 INT16 INT32")

    class Logger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def log(self, severity, msg):
            pass

    class Dims(tuple):
        MAX_DIMS = 8

    class PluginField:  # TensorRT keeps a field's data as a numpy array (bytes: int8)
        def __init__(self, name, data=None, type=None):
            self.name, self.type = name, type
            self.data = np.frombuffer(data, np.int8) if isinstance(data, bytes) else np.asarray(data)

    class PluginRegistry:
        def __init__(self):
            self.creators = {}

        def register_creator(self, creator, namespace):
            self.creators[(creator.name, creator.plugin_version, namespace)] = creator
            return True

        def get_creator(self, name, version, namespace):
            return self.creators.get((name, version, namespace))

    registry = PluginRegistry()
    trt.Logger, trt.Dims, trt.PluginField, trt.PluginFieldCollection = Logger, Dims, PluginField, list
    trt.get_plugin_registry = lambda: registry
    trt.nptype = lambda dtype: {trt.float32: "float32", trt.float16: "float16"}[dtype]
    for name in ("IPluginV3", "IPluginV3QuickCore", "IPluginV3QuickBuild", "IPluginV3QuickAOTBuild",
                 "IPluginV3QuickRuntime", "IPluginCreatorV3Quick", "ISymExpr", "ITensor"):
        setattr(trt, name, type(name, (), {"__init__": lambda self, *a, **k: None}))

    class PluginTensorDesc:
        def __init__(self, dims=(), type=None, format=None, scale=1.0):
            self.dims, self.type, self.format, self.scale = Dims(dims), type, format, scale

    class DynamicPluginTensorDesc:
        def __init__(self, desc, min=None, max=None):
            self.desc, self.min, self.max = desc, min, max

    class DimsExprs(list):
        def __init__(self, n):
            super().__init__([None] * n)

    trt.PluginTensorDesc, trt.DynamicPluginTensorDesc, trt.DimsExprs = PluginTensorDesc, DynamicPluginTensorDesc, DimsExprs
    trt.IDimensionExpr, trt.IExprBuilder = IDimensionExpr, ExprBuilder
    return trt


class IDimensionExpr:
    """A dimension: an int (build-time constant) or the text of a symbolic expression."""

    def __init__(self, value):
        self.value = value

    def is_constant(self) -> bool:
        return isinstance(self.value, int)

    def get_constant_value(self) -> int:
        return self.value

    def __repr__(self):
        return f"Dim({self.value})"


_OPS = {"SUM": ("+", lambda a, b: a + b), "PROD": ("*", lambda a, b: a * b), "SUB": ("-", lambda a, b: a - b),
        "FLOOR_DIV": ("//", lambda a, b: a // b), "CEIL_DIV": ("cdiv", lambda a, b: -(-a // b)),
        "MAX": ("max", max), "MIN": ("min", min), "EQUAL": ("==", lambda a, b: int(a == b)),
        "LESS": ("<", lambda a, b: int(a < b))}


class ExprBuilder:
    """TensorRT's IExprBuilder: constants fold, anything symbolic becomes the text of the expression."""

    def constant(self, v: int) -> IDimensionExpr:
        return IDimensionExpr(int(v))

    def operation(self, op, a: IDimensionExpr, b: IDimensionExpr) -> IDimensionExpr:
        sym, fn = _OPS[op.name]
        if a.is_constant() and b.is_constant():
            return IDimensionExpr(fn(a.value, b.value))
        return IDimensionExpr(f"({a.value}{sym}{b.value})")


@contextlib.contextmanager
def tensorrt_plugin(version: str | None = None):
    """``with tensorrt_plugin() as (trt, trtp):`` the stand-in ``tensorrt`` and NVIDIA's ``tensorrt.plugin``
    in sys.modules; on exit sys.modules is as before (every ``tensorrt*`` module restored or removed)."""
    plugin_dir = bindings_plugin_dir()
    assert plugin_dir is not None, "tensorrt-cu12-bindings is not installed (pip install -e '.[test]')"
    saved = {n: m for n, m in sys.modules.items() if n == "tensorrt" or n.startswith("tensorrt.")}
    for n in saved:
        del sys.modules[n]
    try:
        trt = sys.modules["tensorrt"] = native_standin(version or bindings_version() or "0")
        spec = importlib.util.spec_from_file_location("tensorrt.plugin", plugin_dir / "__init__.py",
                                                      submodule_search_locations=[str(plugin_dir)])
        trtp = sys.modules["tensorrt.plugin"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(trtp)  # its __init__ imports every tensorrt.plugin._* module
        trt.plugin = trtp
        yield trt, trtp
    finally:
        for n in [n for n in sys.modules if n == "tensorrt" or n.startswith("tensorrt.")]:
            del sys.modules[n]
        sys.modules.update(saved)
