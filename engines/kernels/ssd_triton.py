"""Triton kernels for the Mamba2 SSD: the chunked prefill scan and the single-step decode update.

The torch reference (:mod:`elastic_export.ssd`) defines the numerics; these kernels compute the
same recurrence per head,  S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T,  y_t = S_t C_t,  and
the wrappers have the reference's signatures (``ssd_chunked``, ``ssd_step``). State and outputs are
float32; x, B, C may be float32, float16 or bfloat16 (loaded in their dtype; dots accumulate in
float32 with the operand precision of ``DOT_*`` below; everything else is float32).

Prefill design: one program per (batch, head, block of head channels) walks the sequence chunk by
chunk and keeps its [BLOCK_P, N] slice of the state in registers, so the inputs are read once,
the outputs written once and no per-chunk state ever goes to memory. Per chunk of BLOCK_L steps
(a = dt * A, acum its cumulative sum inside the chunk):
    y     = ((C B^T) * exp(acum_i - acum_j) [j <= i] * dt_j) x   +   exp(acum_i) * C S^T
    S     = exp(acum_last) S + (x * dt * exp(acum_last - acum))^T B
The chunk length is a kernel parameter, not the model's: the chunked form is exact for any chunk
length (only float rounding differs), so the wrapper takes ``chunk_size`` as a hint and clamps it to
16..64 (tl.dot needs 16 rows; 64 keeps the [L, L] tile in registers).

Offsets: batch and sequence offsets are 64-bit; head and channel offsets 32-bit.

Heads map to groups as in the reference: ``group_contiguous`` g = h // (H/G), ``rank_major``
g = h % G. Sequences need not be a multiple of the chunk (masked loads, dt = 0 on the tail).

Kernel argument order is (input pointers, int32 scalars, output pointers, constexprs), the order
the TensorRT AOT plugin launcher passes them (see engines/trt/plugin.py).

Run on CPU with ``TRITON_INTERPRET=1`` set before triton is imported (the tests do).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

HEAD_ORDER_CODES = {"group_contiguous": 0, "rank_major": 1}


# Dot operand precision, always with float32 accumulation:
#   DOT_IEEE  every dot in exact float32 (float32 inputs; the interpreter)
#   DOT_TF32  C B^T in the inputs' own dtype (exact: C and B are already in it), the dots with float32
#             operands (decay-weighted scores, the state) in TF32
#   DOT_LOW   every dot's operands rounded to the inputs' dtype (mamba-ssm's choice; twice TF32's rate)
# The carried state is float32 in registers in every mode.
DOT_IEEE, DOT_TF32, DOT_LOW = 0, 1, 2


@triton.jit
def _mm(a, b, DOT: tl.constexpr, LOW: tl.constexpr):
    if DOT == 0:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DOT == 1:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a.to(LOW), b.to(LOW))


@triton.jit
def _group_of(h, nheads, ngroups, RANK_MAJOR: tl.constexpr):
    """The group of head h in either head order (as elastic_export.ssd.group_heads)."""
    if RANK_MAJOR:
        return h % ngroups
    else:
        return h // (nheads // ngroups)


@triton.jit
def ssd_scan_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, s0_ptr,
    seqlen, nheads, headdim, ngroups, dstate,
    sx_b, sx_l, sx_h, sx_p,
    sdt_b, sdt_l, sdt_h,
    sB_b, sB_l, sB_g, sB_n,
    sC_b, sC_l, sC_g, sC_n,
    s0_b, s0_h, s0_p, s0_n,
    y_ptr, sf_ptr,
    HAS_INIT: tl.constexpr, RANK_MAJOR: tl.constexpr, DOT: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // nheads
    h = pid_bh % nheads
    g = _group_of(h, nheads, ngroups, RANK_MAJOR)
    b64 = b.to(tl.int64)
    LOW: tl.constexpr = x_ptr.dtype.element_ty

    offs_l = tl.arange(0, BLOCK_L)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    pmask = offs_p < headdim
    nmask = offs_n < dstate
    last = offs_l == BLOCK_L - 1
    causal = offs_l[:, None] >= offs_l[None, :]

    A = tl.load(A_ptr + h).to(tl.float32)
    x_base = x_ptr + b64 * sx_b + h * sx_h
    dt_base = dt_ptr + b64 * sdt_b + h * sdt_h
    B_base = B_ptr + b64 * sB_b + g * sB_g
    C_base = C_ptr + b64 * sC_b + g * sC_g
    # y and the final state are contiguous: y [b, l, h, p], final [b, h, p, n]
    y_base = y_ptr + b64 * seqlen * nheads * headdim + h * headdim
    sf_base = sf_ptr + (b64 * nheads + h) * headdim * dstate
    ps_mask = pmask[:, None] & nmask[None, :]

    if HAS_INIT:
        s0 = s0_ptr + b64 * s0_b + h * s0_h + offs_p[:, None] * s0_p + offs_n[None, :] * s0_n
        state = tl.load(s0, mask=ps_mask, other=0.0).to(tl.float32)  # [BLOCK_P, BLOCK_N]
    else:
        state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)

    for t0 in range(0, seqlen, BLOCK_L):
        t32 = t0 + offs_l
        lmask = t32 < seqlen
        t = t32.to(tl.int64)  # l * h * p may pass 2^31 on long prompts
        dt = tl.load(dt_base + t * sdt_l, mask=lmask, other=0.0).to(tl.float32)  # [L]
        acum = tl.cumsum(dt * A, axis=0)  # [L], non-increasing, flat past the end
        x = tl.load(x_base + t[:, None] * sx_l + offs_p[None, :] * sx_p,
                    mask=lmask[:, None] & pmask[None, :], other=0.0).to(tl.float32)  # [L, P]
        Bc = tl.load(B_base + t[:, None] * sB_l + offs_n[None, :] * sB_n,
                     mask=lmask[:, None] & nmask[None, :], other=0.0)  # [L, N], input dtype
        Cc = tl.load(C_base + t[:, None] * sC_l + offs_n[None, :] * sC_n,
                     mask=lmask[:, None] & nmask[None, :], other=0.0)  # [L, N], input dtype

        # 1. intra-chunk: (C B^T) masked by the causal decay, times dt_j, applied to x
        if DOT == 0:
            CB = _mm(Cc, tl.trans(Bc), 0, LOW)  # [L, L]
        else:
            CB = _mm(Cc, tl.trans(Bc), 2, LOW)  # exact products of the inputs' own precision
        decay = tl.exp(tl.where(causal, acum[:, None] - acum[None, :], float("-inf")))
        M = CB * decay * dt[None, :]
        # 2. the carried state's contribution, decayed to each step
        y = _mm(M, x, DOT, LOW) + _mm(Cc, tl.trans(state), DOT, LOW) * tl.exp(acum)[:, None]
        tl.store(y_base + t[:, None] * (nheads * headdim) + offs_p[None, :], y,
                 mask=lmask[:, None] & pmask[None, :])

        # 3. state at the chunk's end (the state itself stays float32 in registers)
        alast = tl.sum(tl.where(last, acum, 0.0), axis=0)
        w = tl.exp(alast - acum) * dt  # [L]
        inc = _mm(tl.trans(x * w[:, None]), Bc, DOT, LOW)  # [P, N]
        state = state * tl.exp(alast) + inc

    tl.store(sf_base + offs_p[:, None] * dstate + offs_n[None, :], state, mask=ps_mask)


@triton.jit
def ssd_step_kernel(
    s_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr,
    nheads, headdim, ngroups, dstate,
    s_b, s_h, s_p, s_n,
    sx_b, sx_h, sx_p,
    sdt_b, sdt_h,
    sB_b, sB_g, sB_n,
    sC_b, sC_g, sC_n,
    y_ptr, so_ptr,
    RANK_MAJOR: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One decode step. so_ptr may equal s_ptr (in-place update; each program owns its slice)."""
    pid_p = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // nheads
    h = pid_bh % nheads
    g = _group_of(h, nheads, ngroups, RANK_MAJOR)
    b64 = b.to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    pmask = offs_p < headdim
    nmask = offs_n < dstate
    ps_mask = pmask[:, None] & nmask[None, :]

    state = tl.load(s_ptr + b64 * s_b + h * s_h + offs_p[:, None] * s_p + offs_n[None, :] * s_n,
                    mask=ps_mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + b64 * sx_b + h * sx_h + offs_p * sx_p, mask=pmask, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + b64 * sdt_b + h * sdt_h).to(tl.float32)
    A = tl.load(A_ptr + h).to(tl.float32)
    Bv = tl.load(B_ptr + b64 * sB_b + g * sB_g + offs_n * sB_n, mask=nmask, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b64 * sC_b + g * sC_g + offs_n * sC_n, mask=nmask, other=0.0).to(tl.float32)

    state = state * tl.exp(dt * A) + (dt * x)[:, None] * Bv[None, :]
    y = tl.sum(state * Cv[None, :], axis=1)  # [P]
    tl.store(y_ptr + (b64 * nheads + h) * headdim + offs_p, y, mask=pmask)
    so = so_ptr + (b64 * nheads + h) * headdim * dstate + offs_p[:, None] * dstate + offs_n[None, :]
    tl.store(so, state, mask=ps_mask)


# ---- launch parameters (shared with the TensorRT plugin) ----------------------------------------

def block_l(chunk_size: int) -> int:
    """The kernel's chunk length from the model's chunk size: a power of two in 16..64."""
    return max(16, min(64, triton.next_power_of_2(max(1, int(chunk_size)))))


def block_p(headdim: int) -> int:
    """Head-channel block: the power of two in 16..64 that wastes the fewest padded channels
    (head dim 80 -> 16, five exact blocks; 64 -> 64), larger on ties."""
    return min((64, 32, 16), key=lambda bp: (triton.cdiv(headdim, bp) * bp, -bp))


def block_n(dstate: int) -> int:
    return max(16, triton.next_power_of_2(dstate))


def num_warps(bl: int, bp: int, bn: int) -> int:
    return 8 if bl * max(bl, bn) + bp * bn >= 8192 else 4


# ---- torch-facing wrappers (same signatures as elastic_export.ssd) -----------------------------

def _check(x, B, head_order):
    if head_order not in HEAD_ORDER_CODES:
        raise ValueError(f"unknown head order {head_order!r}; use one of {tuple(HEAD_ORDER_CODES)}")
    h, g = x.shape[-2], B.shape[-2]
    if h % g:
        raise ValueError(f"{h} heads are not divisible by {g} groups")


def ssd_chunked(x, dt, A, B, C, chunk_size: int, initial_state=None, head_order: str = "group_contiguous",
                out=None, *, config: tuple[int, ...] | None = None):
    """Triton chunked SSD scan. Returns (y [b, l, h, p] float32, final_state [b, h, p, n] float32).

    ``out=(y, final)``: contiguous float32 tensors to write into (the TensorRT JIT plugin's outputs).
    ``config=(block_l, block_p, num_warps[, dot])`` overrides the launch choices (benchmarks tune with
    it). Dots: float32 inputs use exact float32 (DOT_IEEE); float16/bfloat16 inputs TF32 (DOT_TF32) by
    default, or DOT_LOW, operands rounded to the input dtype as mamba-ssm does (twice the tensor-core
    rate; the carried state stays float32 either way).
    """
    _check(x, B, head_order)
    b, l, h, p = x.shape
    g, n = B.shape[-2], B.shape[-1]
    if out is None:
        y = torch.empty(b, l, h, p, device=x.device, dtype=torch.float32)
        final = torch.empty(b, h, p, n, device=x.device, dtype=torch.float32)
    else:
        y, final = out
        if not (y.is_contiguous() and final.is_contiguous() and y.dtype == final.dtype == torch.float32):
            raise ValueError("out tensors must be contiguous float32")
    if b == 0 or h == 0:
        return y, final
    A = A.float().contiguous()
    has_init = initial_state is not None
    s0 = initial_state if has_init else final  # dummy pointer when absent (never read)
    bl, bp, bn = block_l(chunk_size), block_p(p), block_n(n)
    warps = num_warps(bl, bp, bn)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # its bfloat16 tl.dot is wrong; precision moot
    dot = DOT_IEEE if x.dtype == torch.float32 or interpreted else DOT_TF32
    if config is not None:
        bl, bp, warps, dot = (*config, dot)[:4]
    grid = (triton.cdiv(p, bp), b * h)
    ssd_scan_kernel[grid](
        x, dt, A, B, C, s0,
        l, h, p, g, n,
        *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *s0.stride(),
        y, final,
        HAS_INIT=has_init, RANK_MAJOR=head_order == "rank_major", DOT=dot,
        BLOCK_L=bl, BLOCK_P=bp, BLOCK_N=bn, num_warps=warps,
    )
    return y, final


def ssd_step(state, x, dt, A, B, C, head_order: str = "group_contiguous", out_state=None):
    """Triton decode step. state [b,h,p,n] fp32, x [b,h,p], dt [b,h], B, C [b,g,n].

    Returns (y [b,h,p] float32, new_state). ``out_state`` (contiguous float32, may be ``state``
    itself for an in-place update) receives the new state; by default a new tensor does, so the
    input state is left unmodified as in the reference.
    """
    _check(x, B, head_order)
    b, h, p = x.shape
    g, n = B.shape[-2], B.shape[-1]
    y = torch.empty(b, h, p, device=x.device, dtype=torch.float32)
    if out_state is None:
        out_state = torch.empty(b, h, p, n, device=x.device, dtype=torch.float32)
    elif not out_state.is_contiguous() or out_state.dtype != torch.float32:
        raise ValueError("out_state must be a contiguous float32 tensor")
    if b == 0 or h == 0:
        return y, out_state
    A = A.float().contiguous()
    bp, bn = block_p(p), block_n(n)
    ssd_step_kernel[(triton.cdiv(p, bp), b * h)](
        state, x, dt, A, B, C,
        h, p, g, n,
        *state.stride(), *x.stride(), *dt.stride(), *B.stride(), *C.stride(),
        y, out_state,
        RANK_MAJOR=head_order == "rank_major", BLOCK_P=bp, BLOCK_N=bn, num_warps=4,
    )
    return y, out_state
