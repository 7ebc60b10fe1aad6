"""The torch engine's static decode (fixed shapes; torch.compile on CPU, CUDA graph on GPU) equals its
dynamic decode, with left-padded prompts and on a nested budget."""

import torch

from elastic_export.elastic import LayerWidths, Subnet, full_subnet
from engines.torch_engine import TorchEngine
from helpers import random_model


def _half(cfg):
    layers = []
    for t, w in zip(cfg.layers_block_type, full_subnet(cfg).layers):
        if t == "linear_attention":
            layers.append(LayerWidths(mamba_heads=w.mamba_heads - cfg.n_groups, mamba_head_dim=w.mamba_head_dim - 1))
        elif t == "full_attention":
            layers.append(LayerWidths(attn_heads=w.attn_heads - cfg.num_key_value_heads))
        else:
            layers.append(LayerWidths(ffn=w.ffn // 2 + 1))
    return Subnet(cfg.hidden_size - 5, tuple(layers))


def _padded_batch(V, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n:] = torch.randint(3, V, (n,), generator=g)
        mask[i, T - n:] = 1
    return ids, mask


def _compare(model, budgets, compile_):
    dyn = TorchEngine(model, budgets)
    sta = TorchEngine(model, budgets, static=True, max_len=64)
    if not compile_:  # the same static step, eager (fast to test); compiled in the other test
        from engines.cuda_graph_decode import GraphDecoder
        for name, sub in budgets.items():
            sta._static[(name, 3)] = GraphDecoder(model, sub, batch=3, max_len=64, compile=False)
    ids, mask = _padded_batch(model.config.vocab_size, [11, 6, 9], 0)
    for name in budgets:
        dyn.set_budget(name)
        sta.set_budget(name)
        a = dyn.prefill(ids, mask, last_only=True)
        b = sta.prefill(ids, mask, last_only=True)
        assert (a - b).abs().max().item() <= 1e-5
        tok = a.argmax(-1)
        for _ in range(6):
            a, b = dyn.decode(tok), sta.decode(tok)
            assert a.shape == b.shape == (3, model.config.vocab_size)
            assert (a - b).abs().max().item() <= 1e-4
            tok = a.argmax(-1)


def test_static_step_equals_dynamic_decode_padded_and_nested():
    model = random_model(11, head_order="rank_major").eval()
    _compare(model, {"full": full_subnet(model.config), "half": _half(model.config)}, compile_=False)


def test_compiled_static_decode_on_cpu():
    torch.manual_seed(0)
    model = random_model(12, head_order="rank_major").eval()
    _compare(model, {"half": _half(model.config)}, compile_=True)
