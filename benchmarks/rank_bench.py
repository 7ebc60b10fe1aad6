"""One-shot depth ranking (Eq. 5): the old per-layer full forward against the hidden-state reuse of
importance.depth_scores, on the same random ~30M-parameter hybrid (Mamba, attention, MLP layers).

Both run in one process, interleaved, best of N repeats; the machine is shared and noisy, so the
number that matters is the ratio. The scores are checked equal (1e-6 relative) and the orders
identical before anything is reported. Also prints the per-token cost of each and the estimate for
the paper's calibration size (1024 x 8192 tokens) at these window lengths on this device.

    python benchmarks/rank_bench.py --threads 2
    python benchmarks/rank_bench.py --threads 2 --layers 32 --hidden 384 --vocab 8192
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import elastic_export as ee
from elastic_export.importance import PAPER_CALIB_TOKENS, _skip_subnet, compute_device, depth_scores
from elastic_export.model import build_model

PATTERN = ["linear_attention", "mlp", "linear_attention", "full_attention", "mlp", "linear_attention", "mlp",
           "linear_attention", "mlp", "full_attention", "linear_attention", "mlp"]  # Nemotron-H's mix


@torch.no_grad()
def per_layer_full_forward(model, batches):
    """The pre-issue-13 one-shot ranking: a full forward per layer j with skip_layer=j."""
    cfg = model.config
    full = [model(ids).double() for ids in batches]
    den = sum(float(m.pow(2).sum()) for m in full) or 1.0
    sub = _skip_subnet(cfg, set())
    scores = torch.zeros(cfg.num_hidden_layers, dtype=torch.float64)
    for j in range(cfg.num_hidden_layers):
        scores[j] = sum(float((m - model(ids, subnet=sub, skip_layer=j).double()).pow(2).sum())
                        for ids, m in zip(batches, full)) / den
    model._views.clear()
    return scores, torch.argsort(scores, stable=True).tolist()


def _model(dtype, device, layers=12, hidden=640, vocab=16384):
    """~42M parameters at 12 layers x 640 (Nemotron Nano 12B has 62 layers: the deeper, the more reuse saves)."""
    cfg = ee.ModelConfig(vocab_size=vocab, hidden_size=hidden, layers_block_type=(PATTERN * 8)[:layers],
                         mamba_num_heads=hidden // 32, mamba_head_dim=64, n_groups=2, ssm_state_size=64,
                         conv_kernel=4, chunk_size=64, num_attention_heads=hidden // 64, num_key_value_heads=2,
                         head_dim=64, intermediate_size=4 * hidden,
                         tie_word_embeddings=True)
    m = build_model(cfg, seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, p in m.named_parameters():
            if not name.endswith(("A_log", "dt_bias", "norm.weight", "norm_f.weight", ".D")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.6 / max(1, p.shape[-1]) ** 0.5)
    return m.to(dtype=dtype, device=device).eval()


def _time(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=640)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = compute_device(a.device)
    model = _model(getattr(torch, a.dtype), dev, a.layers, a.hidden, a.vocab)
    ids = torch.randint(0, model.config.vocab_size, (a.windows, a.seq_len), generator=torch.Generator().manual_seed(1))
    batches = [b.to(dev) for b in ids.split(a.batch_size)]
    old = new = float("inf")
    for _ in range(a.repeats):  # interleaved, best of N
        t, ref = _time(lambda: per_layer_full_forward(model, batches), dev)
        old = min(old, t)
        t, got = _time(lambda: depth_scores(model, batches), dev)
        new = min(new, t)
        torch.testing.assert_close(got[0], ref[0], rtol=1e-6 if a.dtype == "float32" else 1e-2, atol=0)
        if a.dtype == "float32":
            assert got[1] == ref[1]
    tokens = ids.numel()
    print(f"model {model.num_parameters() / 1e6:.1f}M params, {a.layers} layers x {a.hidden}, vocab {a.vocab}, "
          f"{a.dtype} on {dev}, "
          f"{a.threads} threads; calibration {a.windows} x {a.seq_len} tokens, batch {a.batch_size}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'one-shot depth ranking':<28}{'s':>9}{'s/token':>12}{'1024x8192 h':>14}")
    for name, t in (("per-layer full forward", old), ("hidden-state reuse", new)):
        print(f"{name:<28}{t:>9.3f}{t / tokens:>12.3g}{t / tokens * PAPER_CALIB_TOKENS / 3600:>14.3g}")
    checked = "1e-6 relative, same order" if a.dtype == "float32" else "1e-2 relative (bf16)"
    print(f"speed-up (old / reuse): {old / new:.2f}x  (scores equal to {checked})")


if __name__ == "__main__":
    main()
