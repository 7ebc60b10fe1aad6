"""Rank-major query heads must be a permutation of group-contiguous ones (found while testing ONNX export)."""

import torch

from elastic_export.model import build_model
from helpers import randomize, tiny_config


@torch.no_grad()
def test_rank_major_attention_equals_permuted_group_contiguous():
    cfg = tiny_config(0, head_order="rank_major", layers_block_type=["full_attention"], num_key_value_heads=2,
                      num_attention_heads=6)
    m = randomize(build_model(cfg), 0).eval()
    m2 = build_model(cfg.replace(head_order="group_contiguous"))
    m2.load_state_dict(m.state_dict())
    nkv, h, hd = cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim
    r = h // nkv
    perm = torch.tensor([j * nkv + g for g in range(nkv) for j in range(r)])  # group-contiguous slot -> head
    a, a2 = m.backbone.layers[0].mixer, m2.backbone.layers[0].mixer
    a2.q_proj.weight.copy_(a.q_proj.weight.view(h, hd, -1)[perm].reshape(h * hd, -1))
    a2.o_proj.weight.copy_(a.o_proj.weight.view(-1, h, hd)[:, perm].reshape(-1, h * hd))
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    torch.testing.assert_close(m(ids), m2(ids), atol=1e-5, rtol=1e-5)
