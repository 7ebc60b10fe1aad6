"""Activation-aware quantization: per-column mean squared input activations of every quantized matmul.

The calibration windows (the ones ``rank`` reads: importance.load_calibration) run through the full
model once; every ``F.linear`` whose weight is a whole parameter of the model (the full budget
computes with whole tensors: the fused in_proj, out_proj, q/k/v/o, up/down, lm_head; MoE experts one
expert at a time) adds ``mean over tokens of x**2`` per input column to that parameter's entry. These
are llama.cpp's importance matrix (imatrix): quant.block_scales with method "mse" weights each
column's squared rounding error by them, so the scale search protects the columns that carry large
activations. The embeddings take no matmul input and get none (their search is unweighted).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class _Collect(TorchFunctionMode):
    def __init__(self, model):
        super().__init__()
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def _add(self, name, shape, row, x):
        K = x.shape[-1]
        x2 = x.detach().double().reshape(-1, K).pow(2)
        if name not in self.sums:
            self.sums[name] = torch.zeros(*shape, K, dtype=torch.float64)
            self.counts[name] = torch.zeros(*shape, 1, dtype=torch.float64)
        self.sums[name][row] += x2.sum(0)
        self.counts[name][row] += x2.shape[0]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2:
            x, w = args[0], args[1]
            base = w if w._base is None else w._base
            name = self.names.get(id(base))
            if name is not None and w.shape == base.shape:
                self._add(name, (), (), x)
            elif name is not None and base.dim() == 3 and w.shape == base.shape[1:]:  # one expert of a stack
                self._add(name, (base.shape[0],), w.storage_offset() // w.numel(), x)
        return func(*args, **kwargs)


@torch.no_grad()
def input_importance(model, ids: torch.Tensor, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Parameter name -> float32 mean squared input per column ([K], or [E, K] for stacked experts)
    over the calibration windows ``ids`` [n, L], run through the full model. A column (or an expert)
    that saw no token gets 1 (unweighted)."""
    model = model.eval()
    mode = _Collect(model)
    with mode:
        for i in range(0, ids.shape[0], batch_size):
            model(ids[i:i + batch_size])
    out = {}
    for name, s in mode.sums.items():
        c = mode.counts[name]
        out[name] = torch.where(c > 0, s / c.clamp(min=1), torch.ones_like(s)).float()
    return out
