"""Our MoE layer (elastic_export.moe) against transformers' NemotronHMoE on the same weights, CPU.

Both run side by side in one process, interleaved, best of N repeats; the machine is shared and
noisy, so the numbers that matter are the ratios. transformers runs its eager experts (a loop over
the experts hit, as ours) and, where the sizes allow it (strides multiple of 16 bytes), its default
``grouped_mm`` (torch.nn.functional.grouped_mm). Outputs are checked equal before timing.

    python benchmarks/moe_bench.py --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

SIZES = [  # (name, hidden, experts, expert ffn, shared ffn, top-k, latent)
    ("small", 512, 16, 256, 512, 2, None),
    ("nano-like/8", 336, 128, 232, 464, 6, None),  # Nemotron 3 Nano's shapes / 8
    ("super-like/8", 512, 64, 336, 672, 4, 128),  # latent MoE
]


def _pair(hidden, experts, ffn, shared, top_k, latent, seed=0):
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMoE

    import elastic_export as ee
    from elastic_export.elastic import full_subnet, moe_views
    from elastic_export.moe import MoE

    cfg = ee.ModelConfig(vocab_size=64, hidden_size=hidden, layers_block_type=["moe"], n_routed_experts=experts,
                         num_experts_per_tok=top_k, moe_intermediate_size=ffn,
                         moe_shared_expert_intermediate_size=shared, moe_latent_size=latent,
                         routed_scaling_factor=2.5)
    torch.manual_seed(seed)
    ours = MoE(cfg, cfg.layer_dims(0), 0)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.05)
        ours.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    theirs = NemotronHMoE(NemotronHConfig.from_dict(cfg.to_dict()))
    state = {k: v for k, v in ours.state_dict().items()}
    theirs.load_state_dict(state)
    views = moe_views(ours, full_subnet(cfg).layers[0], hidden)
    return ours, views, theirs


def _interleaved(fns: dict, repeats: int) -> dict:
    """Best time of each function, the functions run in turn within every repeat (a shared, noisy
    machine slows all of them alike within a round)."""
    for fn in fns.values():
        fn()  # warm up (allocator, thread pool)
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def _with(module, impl: str, x):
    module.experts.config._experts_implementation = impl
    return module(x)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 512])
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} threads, float32, best of {a.repeats}")
    print(f"{'size':<14} {'tokens':>6} {'ours ms':>9} {'eager ms':>9} {'grouped ms':>11} {'eager/ours':>11} "
          f"{'grouped/ours':>13}")
    for name, D, E, F, S, k, L in SIZES:
        ours, views, theirs = _pair(D, E, F, S, k, L)
        for T in a.tokens:
            x = torch.randn(1, T, D)
            with torch.no_grad():
                want = _with(theirs, "eager", x)
                assert (ours(x, views) - want).abs().max().item() < 1e-4
                fns = {"ours": lambda: ours(x, views), "eager": lambda: _with(theirs, "eager", x),
                       "grouped": lambda: _with(theirs, "grouped_mm", x)}
                try:
                    assert (_with(theirs, "grouped_mm", x) - want).abs().max().item() < 1e-4
                except RuntimeError:  # its alignment rule on the CPU
                    del fns["grouped"]
                t = _interleaved(fns, a.repeats)
                t_ours, t_eager, t_grouped = t["ours"], t["eager"], t.get("grouped", float("nan"))
            print(f"{name:<14} {T:>6} {1e3 * t_ours:>9.2f} {1e3 * t_eager:>9.2f} {1e3 * t_grouped:>11.2f} "
                  f"{t_eager / t_ours:>11.2f} {t_grouped / t_ours:>13.2f}")


if __name__ == "__main__":
    main()
