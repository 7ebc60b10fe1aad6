"""The chunked SSD scan and the decode step against a float64 sequential recurrence."""

import pytest
import torch

from elastic_export.ssd import expand_groups, ssd_chunked, ssd_step


def recurrence64(x, dt, A, B, C, init, order):
    """S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T ; y_t = S_t C_t, in float64, one step at a time."""
    b, l, h, p = x.shape
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    Bh, Ch = expand_groups(B, h, order, 2), expand_groups(C, h, order, 2)
    S = init.double().clone()
    ys = []
    for t in range(l):
        S = S * torch.exp(dt[:, t] * A)[..., None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None]
        ys.append((S @ Ch[:, t, :, :, None]).squeeze(-1))
    return torch.stack(ys, 1), S


def rel(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


CASES = [  # b, l, h, p, g, n, chunk
    (2, 37, 6, 5, 2, 7, 8),
    (1, 64, 4, 3, 4, 5, 16),
    (3, 5, 3, 4, 1, 6, 8),
    (2, 100, 12, 7, 3, 9, 32),
]


@pytest.mark.parametrize("order", ["group_contiguous", "rank_major"])
@pytest.mark.parametrize("case", CASES)
def test_chunked_scan_and_step_match_float64_recurrence(case, order):
    b, l, h, p, g, n, cs = case
    gen = torch.Generator().manual_seed(sum(case))
    x = torch.randn(b, l, h, p, generator=gen)
    dt = torch.rand(b, l, h, generator=gen) * 0.5 + 0.01
    A = -(torch.rand(h, generator=gen) * 2 + 0.1)
    B, C = torch.randn(b, l, g, n, generator=gen), torch.randn(b, l, g, n, generator=gen)
    init = torch.randn(b, h, p, n, generator=gen)
    y_ref, s_ref = recurrence64(x, dt, A, B, C, init, order)

    y, s = ssd_chunked(x, dt, A, B, C, cs, init, order)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert rel(y, y_ref) <= 1e-5 and rel(s, s_ref) <= 1e-5

    state, ys = init.clone(), []
    for t in range(l):
        yt, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], order)
        ys.append(yt)
    assert rel(torch.stack(ys, 1), y_ref) <= 1e-5 and rel(state, s_ref) <= 1e-5


def test_scan_without_initial_state_and_bf16_inputs():
    gen = torch.Generator().manual_seed(3)
    b, l, h, p, g, n = 2, 19, 4, 6, 2, 8
    x = torch.randn(b, l, h, p, generator=gen)
    dt = torch.rand(b, l, h, generator=gen) * 0.3 + 0.02
    A = -(torch.rand(h, generator=gen) + 0.2)
    B, C = torch.randn(b, l, g, n, generator=gen), torch.randn(b, l, g, n, generator=gen)
    y_ref, s_ref = recurrence64(x, dt, A, B, C, torch.zeros(b, h, p, n), "group_contiguous")
    y, s = ssd_chunked(x, dt, A, B, C, 8)
    assert rel(y, y_ref) <= 1e-5 and rel(s, s_ref) <= 1e-5
    yb, sb = ssd_chunked(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), 8)
    assert sb.dtype == torch.float32  # the state stays float32 whatever the inputs
    assert rel(yb, y_ref) <= 3e-2
