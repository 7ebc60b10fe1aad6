"""The Mamba2 SSD scan: a readable chunked reference, the single-step decode update, and dispatch.

Shapes (b batch, l sequence, h heads, p head dim, g groups, n state size, c chunks):
    x [b, l, h, p]   dt [b, l, h] (after softplus and clamp)   A [h] (negative)
    B, C [b, l, g, n]   state [b, h, p, n] (always float32)
Heads map to groups by ``head_order``: ``group_contiguous`` (HF: h // (h/g)) or ``rank_major``
(nested checkpoints: h % g). The D skip and the z gate stay outside the scan.

The recurrence, per head:   S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T,   y_t = S_t C_t.

The chunked form (Dao & Gu, "Transformers are SSMs", the minimal SSD listing) computes it in four
steps: (1) the quadratic intra-chunk term, (2) each chunk's state, (3) the inter-chunk recurrence
over chunk states, (4) the contribution of the carried state to each chunk's outputs. It pads the
sequence to whole chunks with dt = 0 (no decay, no input), so the final state is exact, and has
no Python branch on the sequence length (it exports to ONNX with a dynamic length).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

# Faster kernels register here (engines.kernels on CUDA; mamba-ssm when importable).
# Scan: fn(x, dt, A, B, C, chunk_size, initial_state, head_order) -> (y, final_state) or None to decline.
# Step: fn(state, x, dt, A, B, C, head_order) -> (y, new_state) or None to decline.
_SCAN_KERNELS: list[Callable] = []
_STEP_KERNELS: list[Callable] = []


def register_scan_kernel(fn: Callable) -> None:
    if fn not in _SCAN_KERNELS:
        _SCAN_KERNELS.insert(0, fn)


def register_step_kernel(fn: Callable) -> None:
    if fn not in _STEP_KERNELS:
        _STEP_KERNELS.insert(0, fn)


def unregister_kernel(fn: Callable) -> None:
    """Remove a scan or step kernel registered above (no error when it is not registered)."""
    for kernels in (_SCAN_KERNELS, _STEP_KERNELS):
        if fn in kernels:
            kernels.remove(fn)


def group_heads(t: torch.Tensor, groups: int, head_order: str, dim: int) -> torch.Tensor:
    """View the head axis ``dim`` of t as (groups, heads_per_group), group first. No copy."""
    h = t.shape[dim]
    r = h // groups
    if head_order == "group_contiguous":
        return t.unflatten(dim, (groups, r))
    return t.unflatten(dim, (r, groups)).transpose(dim, dim + 1)


def ungroup_heads(t: torch.Tensor, head_order: str, dim: int) -> torch.Tensor:
    """Inverse of :func:`group_heads`: (groups, heads_per_group) at ``dim`` back to one head axis."""
    if head_order == "group_contiguous":
        return t.flatten(dim, dim + 1)
    return t.transpose(dim, dim + 1).flatten(dim, dim + 1)


def expand_groups(t: torch.Tensor, heads: int, head_order: str, dim: int) -> torch.Tensor:
    """Per-group tensor (groups at ``dim``) -> per-head tensor, following the head order."""
    groups = t.shape[dim]
    if head_order == "group_contiguous":
        return t.repeat_interleave(heads // groups, dim=dim)
    reps = [1] * t.dim()
    reps[dim] = heads // groups
    return t.repeat(*reps)


def segsum(a: torch.Tensor) -> torch.Tensor:
    """[..., T] -> [..., T, T] with out[i, j] = sum(a[j+1 .. i]) for j <= i, -inf above the diagonal."""
    T = a.shape[-1]
    a = a.unsqueeze(-1).expand(*a.shape, T)  # [..., T(i), T(j)]: a[i] in every column j
    strict = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    a = a.masked_fill(~strict, 0.0)
    out = torch.cumsum(a, dim=-2)
    return out.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=a.device).tril(0), float("-inf"))


def ssd_chunked(x, dt, A, B, C, chunk_size: int, initial_state=None, head_order: str = "group_contiguous"):
    """Reference chunked SSD scan in float32. Returns (y [b, l, h, p], final_state [b, h, p, n])."""
    b, l, h, p = x.shape
    g, n = B.shape[-2], B.shape[-1]
    r = h // g
    cs = chunk_size
    pad = (-l) % cs
    x, dt, B, C = (t.float() for t in (x, dt, B, C))
    A = A.float()

    # Pad to whole chunks: dt = 0 on padding means no decay and no input there.
    X = F.pad(x * dt[..., None], (0, 0, 0, 0, 0, pad))  # [b, T, h, p]
    Adt = F.pad(dt * A, (0, 0, 0, pad))  # [b, T, h]
    B = F.pad(B, (0, 0, 0, 0, 0, pad))  # [b, T, g, n]
    C = F.pad(C, (0, 0, 0, 0, 0, pad))
    nc = X.shape[1] // cs

    # Heads as (group, head-in-group) so B and C broadcast over the heads of their group.
    X = group_heads(X, g, head_order, 2).reshape(b, nc, cs, g, r, p).permute(0, 3, 4, 1, 2, 5)  # [b,g,r,c,l,p]
    Adt = group_heads(Adt, g, head_order, 2).reshape(b, nc, cs, g, r).permute(0, 3, 4, 1, 2)  # [b,g,r,c,l]
    B = B.reshape(b, nc, cs, g, n).permute(0, 3, 1, 2, 4).unsqueeze(2)  # [b,g,1,c,l,n]
    C = C.reshape(b, nc, cs, g, n).permute(0, 3, 1, 2, 4).unsqueeze(2)  # [b,g,1,c,l,n]
    A_cum = torch.cumsum(Adt, dim=-1)  # [b,g,r,c,l]

    # 1. Intra-chunk (diagonal blocks): y_l = sum_{s<=l} C_l.B_s exp(A_cum_l - A_cum_s) X_s
    #    Inside one chunk the cumulative sums stay small, so the plain difference is accurate.
    causal = torch.ones(cs, cs, dtype=torch.bool, device=X.device).tril()
    Lmat = (A_cum[..., :, None] - A_cum[..., None, :]).masked_fill_(~causal, float("-inf")).exp_()  # [b,g,r,c,l,s]
    CB = C @ B.transpose(-1, -2)  # [b,g,1,c,l,s]
    # in place only without autograd: exp_'s backward needs its output unmodified (training)
    Y_diag = (Lmat.mul_(CB) if not torch.is_grad_enabled() else Lmat * CB) @ X  # [b,g,r,c,l,p]

    # 2. State of each chunk from its own inputs: sum_l exp(A_cum_last - A_cum_l) B_l X_l^T
    decay_states = torch.exp(A_cum[..., -1:] - A_cum)  # [b,g,r,c,l]
    states = (B * decay_states[..., None]).transpose(-1, -2) @ X  # [b,g,r,c,n,p]

    # 3. Inter-chunk recurrence over chunk boundaries (a small [c+1, c+1] decay matrix).
    if initial_state is None:
        init = torch.zeros(b, g, r, 1, n, p, dtype=X.dtype, device=X.device)
    else:
        init = group_heads(initial_state.float(), g, head_order, 1).transpose(-1, -2).unsqueeze(3)  # [b,g,r,1,n,p]
    states = torch.cat([init, states], dim=3)  # [b,g,r,c+1,n,p]
    decay_chunk = torch.exp(segsum(F.pad(A_cum[..., -1], (1, 0))))  # [b,g,r,c+1,c+1]
    new_states = (decay_chunk @ states.flatten(-2)).unflatten(-1, (n, p))  # [b,g,r,c+1,n,p]
    states, final = new_states[:, :, :, :-1], new_states[:, :, :, -1]

    # 4. Carried state -> outputs of each chunk.
    Y_off = (C @ states) * torch.exp(A_cum)[..., None]  # [b,g,r,c,l,p]

    y = (Y_diag + Y_off).permute(0, 3, 4, 1, 2, 5)  # [b,c,l,g,r,p]
    y = ungroup_heads(y, head_order, 3).reshape(b, nc * cs, h, p)[:, :l]
    final = ungroup_heads(final.transpose(-1, -2), head_order, 1)  # [b,h,p,n]
    return y, final


def ssd_step(state, x, dt, A, B, C, head_order: str = "group_contiguous"):
    """One decode step. state [b,h,p,n] fp32, x [b,h,p], dt [b,h], B, C [b,g,n].

    Returns (y [b,h,p] float32, new_state). The state is not modified in place.
    """
    h = x.shape[1]
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    Bh = expand_groups(B, h, head_order, 1)  # [b,h,n]
    Ch = expand_groups(C, h, head_order, 1)
    dA = torch.exp(dt * A.float())  # [b,h]
    state = state * dA[..., None, None] + (dt[..., None] * x)[..., None] * Bh[:, :, None, :]
    y = (state @ Ch[..., None]).squeeze(-1)  # [b,h,p]
    return y, state


def ssd_step_(state, x, dt, A, B, C, head_order: str = "group_contiguous"):
    """:func:`ssd_update` in place: the contiguous float32 ``state`` [b,h,p,n] becomes the new state.
    Returns y [b,h,p] float32. (The one-token decode step of the torch engine, model.decode_step.)

    The head axis is viewed as two axes without a copy ([h/g, g] rank-major, [g, h/g] group-contiguous)
    so that B and C broadcast over the heads of their group instead of being repeated.
    """
    for kernel in _STEP_KERNELS:  # Triton on CUDA, where enabled
        out = kernel(state, x, dt, A, B, C, head_order)
        if out is not None:
            state.copy_(out[1])
            return out[0]
    b, h, p = x.shape
    g, n = B.shape[-2], B.shape[-1]
    heads, groups = ((h // g, g), (1, g)) if head_order == "rank_major" else ((g, h // g), (g, 1))
    f32 = [t if t.dtype == torch.float32 else t.float() for t in (dt, x, A, B, C)]  # no op when float32
    dt, x, A, B, C = f32
    S = state.view(b, *heads, p, n)
    dt = dt.view(b, *heads, 1, 1)
    S.mul_(torch.exp(dt * A.view(*heads, 1, 1))).addcmul_(x.view(b, *heads, p, 1) * dt, B.view(b, *groups, 1, n))
    return (S @ C.view(b, *groups, n, 1)).view(b, h, p)


def ssd_prefix_state(x, dt, A, B, initial_state=None, head_order: str = "group_contiguous"):
    """The state after the l positions of a short window (one chunk), without the outputs: what a
    rejected speculative suffix rewinds to (cache.InferenceCache.rewind). x [b,l,h,p], dt [b,l,h],
    B [b,l,g,n], initial_state [b,h,p,n] or None -> [b,h,p,n] float32.

        S_l = exp(sum_s dt_s A) S_0 + sum_s exp(sum_{t>s} dt_t A) dt_s x_s B_s^T
    """
    h = x.shape[2]
    Adt = dt.float() * A.float()  # [b,l,h]
    cum = torch.cumsum(Adt, dim=1)
    total = cum[:, -1]  # [b,h]
    w = torch.exp(total[:, None] - cum) * dt.float()  # [b,l,h]: decay after s, times dt_s
    Bh = expand_groups(B.float(), h, head_order, 2)  # [b,l,h,n]
    state = torch.einsum("blh,blhp,blhn->bhpn", w, x.float(), Bh)
    if initial_state is not None:
        state = state + torch.exp(total)[..., None, None] * initial_state.float()
    return state


def ssd_scan(x, dt, A, B, C, chunk_size: int, initial_state=None, head_order: str = "group_contiguous"):
    """Dispatch: the first registered kernel that accepts the inputs, else the torch reference."""
    for kernel in _SCAN_KERNELS:
        out = kernel(x, dt, A, B, C, chunk_size, initial_state, head_order)
        if out is not None:
            return out
    return ssd_chunked(x, dt, A, B, C, chunk_size, initial_state, head_order)


def ssd_update(state, x, dt, A, B, C, head_order: str = "group_contiguous"):
    """Dispatch for one decode step: the first registered step kernel that accepts, else ssd_step."""
    for kernel in _STEP_KERNELS:
        out = kernel(state, x, dt, A, B, C, head_order)
        if out is not None:
            return out
    return ssd_step(state, x, dt, A, B, C, head_order)


def _mamba_ssm_kernel(x, dt, A, B, C, chunk_size, initial_state, head_order):
    """mamba-ssm's fused chunked scan, used on CUDA when the package is importable."""
    if not x.is_cuda or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return None
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:  # not installed, or built for another CUDA: fall back to the reference
        _SCAN_KERNELS.remove(_mamba_ssm_kernel)
        return None
    g = B.shape[2]
    if head_order == "rank_major":  # mamba-ssm wants group-contiguous heads
        perm = group_heads(torch.arange(x.shape[2], device=x.device), g, head_order, 0).flatten()
        inv = torch.argsort(perm)
        x, dt = x[:, :, perm], dt[:, :, perm]
        A = A[perm]
        initial_state = None if initial_state is None else initial_state[:, perm]
    y, final = mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, initial_states=initial_state,
                                         return_final_states=True)
    if head_order == "rank_major":
        y, final = y[:, :, inv], final[:, inv]
    return y.float(), final.float()


_SCAN_KERNELS.append(_mamba_ssm_kernel)
