"""Prefill speed of our model against transformers' NemotronHForCausalLM on the same weights.

Both run side by side in one process, interleaved, best of N repeats; the machine is shared and
noisy, so the numbers that matter are the ratios. Achieved GFLOP/s are counted analytically and
compared with a large matmul measured in the same run.

    python benchmarks/prefill_bench.py --threads 2 --lengths 256 512 1024 2048 4096
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch


def analytic_flops(cfg, L: int, batch: int = 1) -> float:
    """FLOPs of one prefill of L tokens: projections, attention (causal), chunked SSD, conv, lm_head."""
    D, T = cfg.hidden_size, L * batch
    f = 2.0 * T * D * cfg.vocab_size  # lm_head
    for i, t in enumerate(cfg.layers_block_type):
        d = cfg.layer_dims(i)
        if t == "linear_attention":
            H, P, G, N, cs = d["mamba_num_heads"], d["mamba_head_dim"], cfg.n_groups, cfg.ssm_state_size, \
                cfg.chunk_size
            I = H * P
            f += 2.0 * T * D * (2 * I + 2 * G * N + H) + 2.0 * T * I * D  # in_proj, out_proj
            f += 2.0 * T * (I + 2 * G * N) * cfg.conv_kernel  # depthwise conv
            c = min(cs, L)
            f += batch * (2.0 * L * c * N * G + 2.0 * L * c * H * P)  # intra-chunk C.B and (CB*L).X
            f += batch * (2.0 * L * H * P * N * 2)  # chunk states and state->output
        elif t == "full_attention":
            h, kv, hd = d["num_attention_heads"], cfg.num_key_value_heads, cfg.head_dim
            f += 2.0 * T * D * (h + 2 * kv) * hd + 2.0 * T * h * hd * D
            f += batch * 2.0 * 2.0 * h * hd * L * (L + 1) / 2  # QK^T and PV, causal half
        else:
            f += 2.0 * T * D * d["intermediate_size"] * 2
    return f


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = best_time(lambda: a @ b, repeats)
    return 2 * n ** 3 / t / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="hybrid-5m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    from transformers import NemotronHForCausalLM as HFModel

    from elastic_export.config import preset
    from elastic_export.model import build_model

    cfg = preset(args.preset)
    ours = build_model(cfg, seed=0).eval()
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        theirs = HFModel.from_pretrained(d, dtype=torch.float32).eval()
    print(f"model {args.preset}: {ours.num_parameters() / 1e6:.2f}M parameters, fp32, {args.threads} threads, "
          f"torch {torch.__version__}")
    mm = matmul_gflops()
    print(f"reference: 2048^3 matmul {mm:.1f} GFLOP/s")
    print(f"{'L':>6} {'ours ms':>9} {'hf ms':>9} {'speedup':>8} {'ours GF/s':>10} {'% matmul':>9} {'hf % matmul':>12}")
    rows = []
    with torch.no_grad():
        for L in args.lengths:
            ids = torch.randint(0, cfg.vocab_size, (args.batch, L))
            a = torch.testing.assert_close  # correctness first: same logits
            a(ours(ids[:, :64]), theirs(ids[:, :64]).logits, atol=1e-4, rtol=1e-4)
            t_ours = best_time(lambda: ours(ids), args.repeats)
            t_hf = best_time(lambda: theirs(ids, logits_to_keep=0), args.repeats)
            fl = analytic_flops(cfg, L, args.batch)
            rows.append((L, t_ours, t_hf))
            print(f"{L:>6} {t_ours * 1e3:>9.1f} {t_hf * 1e3:>9.1f} {t_hf / t_ours:>7.2f}x {fl / t_ours / 1e9:>10.1f} "
                  f"{100 * fl / t_ours / 1e9 / mm:>8.0f}% {100 * fl / t_hf / 1e9 / mm:>11.0f}%")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
