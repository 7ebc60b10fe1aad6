"""The one-token decode step (model.decode_step), which serves the torch engine's dynamic and static
paths, against its reference: the model's full forward over the whole sequence (no cache)."""

from __future__ import annotations

import pytest
import torch

from elastic_export import ssd
from elastic_export.cache import StepState
from elastic_export.elastic import full_subnet
from elastic_fixtures import random_subnet
from helpers import random_model


def _padded(V, lengths, total, seed):
    """[b, total] ids left-padded to the longest prompt (+ the tokens decoded after it) and the mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (len(lengths), total), generator=g)
    mask = torch.ones_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :max(lengths) - n] = 0
    return ids, mask


def _decode(model, subnet, ids, mask, prompt_len, static):
    """Prefill ids[:, :prompt_len] with the model's cached forward, then decode_step for the rest."""
    plan = model.step_plan(subnet)
    cache = model.new_cache()
    out = [model(ids[:, :prompt_len], subnet=subnet, cache=cache, attention_mask=mask[:, :prompt_len])[:, -1]]
    if static:
        state = StepState.zeros(model, subnet, ids.shape[0], ids.shape[1] + 3)
        state.load(cache)
    else:
        state = StepState.from_cache(cache)
    for t in range(prompt_len, ids.shape[1] - 1):
        if static:
            out.append(model.decode_step(ids[:, t], plan, state))
        else:
            state.reserve(t + 1)
            out.append(model.decode_step(ids[:, t], plan, state, length=t))
        assert int(state.pos) == t + 1
    assert all(t.dtype == torch.float32 for t in state.ssm if t is not None)  # in every precision
    return torch.stack(out, dim=1)  # logits of positions prompt_len - 1 .. total - 2


@pytest.mark.parametrize("seed,order", [(1, "rank_major"), (2, "group_contiguous"), (4, "rank_major")])
@pytest.mark.parametrize("static", [False, True])
@torch.no_grad()
def test_decode_step_equals_the_full_forward(seed, order, static):
    model = random_model(seed, head_order=order).eval()
    cfg = model.config
    budgets = [full_subnet(cfg)]
    if order == "rank_major":  # head prefixes need rank-major heads
        budgets += [random_subnet(cfg, seed), random_subnet(cfg, seed + 50)]
    lengths = [9, 13, 5]
    total = 13 + (70 if seed == 1 and not static else 9)  # seed 1 decodes past the KV cache's first growth (64)
    ids, mask = _padded(cfg.vocab_size, lengths, total, seed)
    for subnet in budgets:
        ref = model(ids, subnet=subnet, attention_mask=mask)[:, 12:-1]
        got = _decode(model, subnet, ids, mask, 13, static)
        assert got.dtype == torch.float32 and got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@torch.no_grad()
def test_decode_step_bf16_close_to_fp32():
    """bf16 weights as stored (bf16 compute, float32 SSM state and norms): close to the fp32 forward."""
    model = random_model(5, head_order="rank_major").eval()
    b16 = random_model(5, head_order="rank_major").eval().to(torch.bfloat16)
    subnet = random_subnet(model.config, 3, keep_all=True)
    ids, mask = _padded(model.config.vocab_size, [10, 10], 18, 0)
    ref = model(ids, subnet=subnet, attention_mask=mask)[:, 9:-1]
    ref16 = b16(ids, subnet=subnet, attention_mask=mask)[:, 9:-1]
    for static in (False, True):
        got = _decode(b16, subnet, ids, mask, 10, static)
        scale = ref.abs().max().item()
        assert (got - ref).abs().max().item() <= 0.05 * scale  # bf16 rounding, against fp32
        assert (got - ref16).abs().max().item() <= 0.05 * scale  # and against the bf16 forward
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("order", ["rank_major", "group_contiguous"])
def test_in_place_ssd_step_equals_a_float64_recurrence(order):
    g = torch.Generator().manual_seed(0)
    b, h, p, G, n = 3, 6, 5, 3, 7
    state = torch.randn(b, h, p, n, generator=g)
    x, dt = torch.randn(b, h, p, generator=g), torch.rand(b, h, generator=g)
    A, B, C = -torch.rand(h, generator=g), torch.randn(b, G, n, generator=g), torch.randn(b, G, n, generator=g)
    S, y_ref = state.double(), torch.empty(b, h, p, dtype=torch.float64)
    for k in range(h):  # S = exp(dt A) S + dt x B^T, y = S C, head k in group k % G (rank-major) or k // (h/G)
        gk = k % G if order == "rank_major" else k // (h // G)
        S[:, k] = torch.exp(dt[:, k] * A[k]).double()[:, None, None] * S[:, k] \
            + (dt[:, k, None] * x[:, k]).double()[..., None] * B[:, gk, None].double()
        y_ref[:, k] = (S[:, k] @ C[:, gk, :, None].double())[..., 0]
    y = ssd.ssd_step_(state, x, dt, A, B, C, order)
    assert (y - y_ref).abs().max().item() < 1e-5 and (state - S).abs().max().item() < 1e-5
