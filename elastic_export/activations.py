"""The activation functions a NemotronH config may name: one table, used by the model, the ONNX
exporter and the engines.

transformers' NemotronH looks both config fields up in its ``ACT2FN`` table:
- ``mlp_hidden_act``: the MLP's ``down(act(up(x)))`` (``relu2`` in every NVIDIA checkpoint);
- ``mamba_hidden_act``: the activation after the Mamba2 depthwise conv over xBC (``silu``). The z gate of
  the gated RMSNorm is SiLU whatever the field says (transformers hard-codes it there too).
Every parameter-free entry of ``ACT2FN`` is here, each as a torch function and as ONNX nodes with the
same formula. ``prelu`` and ``xielu`` carry learnable weights that NemotronH checkpoints do not store,
so they are refused.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

_SQRT_2_PI = math.sqrt(2.0 / math.pi)
_LAPLACE_MU, _LAPLACE_SIGMA = 0.707107, 0.282095


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_PI * (x + 0.044715 * x.pow(3))))


# name -> torch function (the formula of transformers' ACT2FN entry of that name)
TORCH: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu2": lambda x: torch.relu(x).square(),
    "relu": torch.relu,
    "relu6": F.relu6,
    "leaky_relu": F.leaky_relu,  # nn.LeakyReLU(): negative slope 0.01
    "silu": F.silu,
    "swish": F.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "linear": lambda x: x,
    "gelu": F.gelu,  # exact (erf)
    "gelu_python": F.gelu,
    "gelu_10": lambda x: F.gelu(x).clamp(-10.0, 10.0),
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_python_tanh": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "hardswish": F.hardswish,
    "mish": F.mish,
    "laplace": lambda x: 0.5 * (1.0 + torch.erf((x - _LAPLACE_MU) / (_LAPLACE_SIGMA * math.sqrt(2.0)))),
    "sqrtsoftplus": lambda x: F.softplus(x).sqrt(),
}

REFUSED = {"prelu": "has a learnable slope", "xielu": "has learnable parameters"}
NAMES = tuple(TORCH)


def unsupported(name: str) -> str | None:
    """Why ``name`` cannot be used (a sentence), or None when it can."""
    if name in TORCH:
        return None
    if name in REFUSED:
        return f"activation {name!r} {REFUSED[name]}, which NemotronH checkpoints do not store"
    return f"unknown activation {name!r}"


def get(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The torch function of a validated name (ModelConfig.validate refuses the others)."""
    return TORCH[name]


# ---- ONNX ---------------------------------------------------------------------------------------

def onnx(g, name: str, x: str, f32: bool = False) -> str:
    """The activation ``name`` of ``x`` as ONNX nodes (g: onnx_graph.GraphBuilder), plain opset-18 ops
    with the torch formula above. ``x`` is at the compute dtype, or float32 with ``f32``; the result
    has the same dtype. Beyond relu/relu2 (exact at any dtype) the arithmetic runs in float32."""
    op = g.op
    if name == "relu2":
        r = op("Relu", x)
        return op("Mul", r, r)
    if name == "relu":
        return op("Relu", x)
    if f32:
        return _onnx_f32(g, name, x)
    return g.to_compute(_onnx_f32(g, name, g.to_f32(x)))


def _onnx_f32(g, name: str, x: str) -> str:
    def c(v: float) -> str:
        return g.const(v, np.float32)

    op = g.op
    if name == "relu6":
        return op("Clip", x, c(0.0), c(6.0))
    if name == "leaky_relu":
        return op("LeakyRelu", x, alpha=0.01)
    if name in ("silu", "swish"):
        return op("Mul", x, op("Sigmoid", x))
    if name == "sigmoid":
        return op("Sigmoid", x)
    if name == "tanh":
        return op("Tanh", x)
    if name == "linear":
        return op("Identity", x)
    if name in ("gelu", "gelu_python", "gelu_10"):
        y = op("Mul", op("Mul", x, c(0.5)), op("Add", c(1.0), op("Erf", op("Mul", x, c(1 / math.sqrt(2.0))))))
        return op("Clip", y, c(-10.0), c(10.0)) if name == "gelu_10" else y
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_accurate", "gelu_fast"):
        k = 0.7978845608 if name == "gelu_fast" else _SQRT_2_PI
        inner = op("Mul", op("Add", x, op("Mul", op("Mul", op("Mul", x, x), x), c(0.044715))), c(k))
        return op("Mul", op("Mul", x, c(0.5)), op("Add", c(1.0), op("Tanh", inner)))
    if name == "quick_gelu":
        return op("Mul", x, op("Sigmoid", op("Mul", x, c(1.702))))
    if name == "hardswish":
        return op("HardSwish", x)
    if name == "mish":
        return op("Mul", x, op("Tanh", op("Softplus", x)))
    if name == "laplace":
        s = op("Div", op("Sub", x, c(_LAPLACE_MU)), c(_LAPLACE_SIGMA * math.sqrt(2.0)))
        return op("Mul", c(0.5), op("Add", c(1.0), op("Erf", s)))
    if name == "sqrtsoftplus":
        return op("Sqrt", op("Softplus", x))
    raise ValueError(unsupported(name))
