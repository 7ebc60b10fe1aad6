"""One MoE layer in ONNX Runtime (CPU, float32): our standard-op graphs (onnx_moe ``dense``: every kept
expert on every token; ``gather``: the top-k experts' weights gathered per token) against ONNX
Runtime's contrib ``com.microsoft.MoE`` operator (``contrib``: only the top-k experts per token) on the
same weights and routing, with our torch layer (elastic_export.moe, grouped by expert) beside them.

The experts use SiLU here: the CPU MoE kernel has no relu2 (the activation of every NVIDIA checkpoint,
CUDA-only in ONNX Runtime), so for relu2 models only the dense form runs on a CPU; its cost does not
depend on the activation. All three are checked equal before timing; they run interleaved, best of N
repeats (the machine is shared and noisy: read the ratios).

    python benchmarks/moe_onnx_bench.py --threads 2
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from moe_bench import SIZES, _interleaved  # same shapes as the torch-vs-transformers benchmark


def _layer(hidden, experts, ffn, shared, top_k, latent, act, seed=0):
    import elastic_export as ee
    from elastic_export.elastic import full_subnet, moe_views
    from elastic_export.moe import MoE

    cfg = ee.ModelConfig(vocab_size=64, hidden_size=hidden, layers_block_type=["moe"], n_routed_experts=experts,
                         num_experts_per_tok=top_k, moe_intermediate_size=ffn, mlp_hidden_act=act,
                         moe_shared_expert_intermediate_size=shared, moe_latent_size=latent,
                         routed_scaling_factor=2.5)
    torch.manual_seed(seed)
    m = MoE(cfg, cfg.layer_dims(0), 0).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
        m.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    return m, moe_views(m, full_subnet(cfg).layers[0], hidden)


def _session(m, v, act, d, form, threads, tmp: Path):
    import onnxruntime as ort

    from elastic_export import onnx_moe

    proto, wf = onnx_moe.layer_model(m, v, act, d, form, location=f"{form}.bin")
    onnx_moe.save_layer_model(proto, wf, tmp / f"{form}.onnx")
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.log_severity_level = 3
    s = ort.InferenceSession(str(tmp / f"{form}.onnx"), so, providers=["CPUExecutionProvider"])
    return lambda x: s.run(None, {"hidden": x})[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 256])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--act", default="silu")
    a = ap.parse_args()
    import onnxruntime as ort

    torch.set_num_threads(a.threads)
    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}, {a.threads} threads, float32, "
          f"experts {a.act}, best of {a.repeats}")
    print(f"{'size':<14} {'tokens':>6} {'dense ms':>9} {'gather ms':>10} {'contrib ms':>11} {'torch ms':>9} "
          f"{'dense/contrib':>14} {'gather/contrib':>15} {'dense/torch':>12} {'contrib/torch':>14}")
    for name, D, E, F, S, k, L in SIZES:
        m, v = _layer(D, E, F, S, k, L, a.act)
        with tempfile.TemporaryDirectory() as tmp:
            dense = _session(m, v, a.act, D, "dense", a.threads, Path(tmp))
            gather = _session(m, v, a.act, D, "gather", a.threads, Path(tmp))
            contrib = _session(m, v, a.act, D, "contrib", a.threads, Path(tmp))
            for T in a.tokens:
                x = torch.randn(T, D, generator=torch.Generator().manual_seed(T))
                xn = x.numpy()
                with torch.no_grad():
                    want = m(x, v).numpy()
                    for f in (dense, gather, contrib):
                        err = np.abs(f(xn) - want).max()
                        assert err < 1e-4, (name, T, err)
                    t = _interleaved({"dense": lambda: dense(xn), "gather": lambda: gather(xn),
                                      "contrib": lambda: contrib(xn), "torch": lambda: m(x, v)}, a.repeats)
                print(f"{name:<14} {T:>6} {1e3 * t['dense']:>9.2f} {1e3 * t['gather']:>10.2f} "
                      f"{1e3 * t['contrib']:>11.2f} {1e3 * t['torch']:>9.2f} {t['dense'] / t['contrib']:>14.2f} "
                      f"{t['gather'] / t['contrib']:>15.2f} {t['dense'] / t['torch']:>12.2f} "
                      f"{t['contrib'] / t['torch']:>14.2f}")


if __name__ == "__main__":
    main()
