"""How should ONNX Runtime sessions of several budgets share one weight? One projection, one token.

A budget needs W[:o, :i] of a stored W [O, I]. Options, timed per call (M = 1 token, decode):
  copy      a contiguous private copy of W[:o, :i] as the graph's initializer (prepacked): no sharing
  slice     the full W fed once as a shared OrtValue input; an in-graph Slice cuts W[:o, :i] every call
  rows      our choice: W[:o] (a row range: contiguous, a zero-copy view of the shared buffer) and the
            activation zero-padded from i to I (so the columns a budget lacks multiply zeros)

    python benchmarks/onnx_sharing_bench.py --threads 1
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def session(nodes, inputs, inits, threads, prepack=True, add=None):
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    for name, val in (add or {}).items():
        so.add_initializer(name, val)
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def per_call(sess, feed, n=300):
    for _ in range(20):
        sess.run_with_ort_values(["y"], feed)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n):
            sess.run_with_ort_values(["y"], feed)
        best = min(best, (time.perf_counter() - t) / n)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    f = TensorProto.FLOAT
    print(f"{'W [O, I]':>12} {'budget [o, i]':>14} {'copy us':>8} {'slice us':>9} {'rows us':>8}  slice/rows")
    for (O, I), (o, i) in [((1168, 256), (1168, 256)), ((1168, 256), (600, 192)), ((4096, 256), (4096, 192)),
                           ((4096, 2048), (3072, 1536)), ((4096, 2048), (4096, 2048))]:
        rng = np.random.default_rng(0)
        W = rng.standard_normal((O, I), dtype=np.float32)
        x = rng.standard_normal((1, i), dtype=np.float32)
        xv = ort.OrtValue.ortvalue_from_numpy(x)
        # copy: private contiguous initializer
        s_copy = session([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)],
                         [helper.make_tensor_value_info("x", f, [1, i])],
                         [numpy_helper.from_array(np.ascontiguousarray(W[:o, :i]), "w")], args.threads)
        # slice: shared full weight as an input, Slice per call
        c = [numpy_helper.from_array(np.array(v, np.int64), n) for v, n in (([0, 0], "st"), ([o, i], "en"))]
        s_slice = session([helper.make_node("Slice", ["W", "st", "en"], ["w"]),
                           helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)],
                          [helper.make_tensor_value_info("x", f, [1, i]),
                           helper.make_tensor_value_info("W", f, [O, I])],
                          c, args.threads)
        Wv = ort.OrtValue.ortvalue_from_numpy(W)
        # rows: a zero-copy row range of the shared buffer, input padded to I
        rows = ort.OrtValue.ortvalue_from_numpy(W[:o])
        # placeholder, replaced by the view (safe: no constant-foldable node reads it; results asserted below)
        w_init = numpy_helper.from_array(np.zeros((o, I), np.float32), "w")
        pads = numpy_helper.from_array(np.array([0, 0, 0, I - i], np.int64), "pads")
        nodes = ([helper.make_node("Pad", ["x", "pads"], ["xp"])] if i < I else []) + \
            [helper.make_node("Gemm", ["xp" if i < I else "x", "w"], ["y"], transB=1)]
        s_rows = session(nodes, [helper.make_tensor_value_info("x", f, [1, i])], [w_init, pads], args.threads,
                         prepack=False, add={"w": rows})
        ref = x @ W[:o, :i].T
        outs = [s.run_with_ort_values(["y"], fd)[0].numpy() for s, fd in
                ((s_copy, {"x": xv}), (s_slice, {"x": xv, "W": Wv}), (s_rows, {"x": xv}))]
        assert all(np.abs(out - ref).max() < 1e-3 for out in outs)
        t = [per_call(s_copy, {"x": xv}), per_call(s_slice, {"x": xv, "W": Wv}), per_call(s_rows, {"x": xv})]
        print(f"{str((O, I)):>12} {str((o, i)):>14} {t[0] * 1e6:>8.1f} {t[1] * 1e6:>9.1f} {t[2] * 1e6:>8.1f}  "
              f"{t[1] / t[2]:.1f}x")


if __name__ == "__main__":
    main()
