"""The static decode step used for CUDA graphs equals the model's own cached decode (run eagerly on
CPU; with CUDA it is also captured and replayed as a graph)."""

from __future__ import annotations

import pytest
import torch

from elastic_export.elastic import LayerWidths, Subnet, full_subnet
from elastic_export.generate import generate
from engines.cuda_graph_decode import GraphDecoder
from tests.helpers import random_model


@pytest.mark.parametrize("seed,order", [(1, "rank_major"), (3, "group_contiguous")])
def test_static_step_matches_cached_decode(seed, order):
    model = random_model(seed=seed, head_order=order).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(seed))
    want = generate(model, ids, 9)
    dec = GraphDecoder(model, batch=2, max_len=32, use_graph=False)
    got = dec.generate(ids, 9)
    assert torch.equal(got, want)
    # logits, step by step, against the model's cache
    with torch.no_grad():
        cache = model.new_cache()
        model(ids, cache=cache)
        dec.prefill(ids)
        for t in range(4):
            tok = dec.token.clone()
            ref = model(tok[:, None], cache=cache)
            assert (dec.step() - ref).abs().max().item() < 1e-4


def _smaller(cfg):
    """A nested budget: narrower everywhere, the first MLP layer skipped."""
    layers, skipped = [], False
    for t, w in zip(cfg.layers_block_type, full_subnet(cfg).layers):
        if t == "linear_attention":
            layers.append(LayerWidths(mamba_heads=w.mamba_heads - cfg.n_groups, mamba_head_dim=w.mamba_head_dim - 2))
        elif t == "full_attention":
            layers.append(LayerWidths(attn_heads=w.attn_heads - cfg.num_key_value_heads))
        elif not skipped:
            layers.append(LayerWidths(kept=False, ffn=w.ffn))
            skipped = True
        else:
            layers.append(LayerWidths(ffn=w.ffn // 2))
    return Subnet(cfg.hidden_size - 8, tuple(layers))


def test_static_step_on_a_nested_budget():
    model = random_model(seed=5, head_order="rank_major").eval()
    sub = _smaller(model.config)
    ids = torch.randint(0, model.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(0))
    want = generate(model, ids, 7, subnet=sub)
    assert torch.equal(GraphDecoder(model, subnet=sub, batch=1, max_len=24, use_graph=False).generate(ids, 7), want)


@pytest.mark.gpu
def test_graph_replay_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    model = random_model(seed=2, head_order="rank_major").eval().cuda()
    ids = torch.randint(0, model.config.vocab_size, (2, 13), device="cuda")
    want = generate(model, ids, 12)
    assert torch.equal(GraphDecoder(model, batch=2, max_len=64).generate(ids, 12), want)
