"""Triton kernels for the SSM scan, plugged into elastic_export's scan dispatch.

``enable_triton_kernels()`` registers the Triton prefill scan and decode step with
:func:`elastic_export.ssd.register_scan_kernel` / ``register_step_kernel``; from then on the torch
model uses them for tensors on the enabled device types (CUDA by default). They decline (and the
torch reference runs) while tracing or exporting, so ONNX export is unaffected.

Importing this package never imports triton; ``available()`` says whether it can.
"""

from __future__ import annotations

import torch

from elastic_export import ssd

_enabled_devices: set[str] = set()


def available() -> tuple[bool, str]:
    """(ok, reason): whether the Triton kernels can run here."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # not installed, or broken for this platform
        return False, f"triton is not importable ({type(e).__name__}: {e})"
    return True, "ok"


def _declines(x: torch.Tensor) -> bool:
    if x.device.type not in _enabled_devices:
        return True
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return True
    try:
        if torch.onnx.is_in_onnx_export():
            return True
    except AttributeError:
        pass
    return x.requires_grad and torch.is_grad_enabled()  # forward-only kernels: leave training to torch


def _scan(x, dt, A, B, C, chunk_size, initial_state, head_order):
    if _declines(x):
        return None
    from .ssd_triton import ssd_chunked
    return ssd_chunked(x, dt, A, B, C, chunk_size, initial_state, head_order)


def _step(state, x, dt, A, B, C, head_order):
    if _declines(x):
        return None
    from .ssd_triton import ssd_step
    return ssd_step(state, x, dt, A, B, C, head_order)


def enable_triton_kernels(devices: tuple[str, ...] = ("cuda",)) -> bool:
    """Route the model's SSD scan and decode step through the Triton kernels on ``devices``.

    Returns False (and changes nothing) when triton is not importable. ``devices=("cpu",)`` only
    makes sense under ``TRITON_INTERPRET=1`` (tests).
    """
    ok, _ = available()
    if not ok:
        return False
    _enabled_devices.update(devices)
    ssd.register_scan_kernel(_scan)
    ssd.register_step_kernel(_step)
    return True


def disable_triton_kernels() -> None:
    _enabled_devices.clear()
    ssd.unregister_kernel(_scan)
    ssd.unregister_kernel(_step)
