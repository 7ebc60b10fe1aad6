"""llama.cpp on our GGUF files against our torch model, and CPU decode speed against our engines.

    bash benchmarks/llama_cpp_build.sh                  # once: llama.cpp (CPU) from llama-cpp-python's sdist
    python benchmarks/llama_cpp_compare.py              # the shipped model, budgets full / 75pct / 50pct

1. Logits. `build --target gguf` (F32, Q8_0) of every budget, run by llama.cpp on a held-out text
   (bytes the model never trained on), against
   - "file": our standalone padded slice in float64 without the dt clamp, i.e. the function the file
     states (llama.cpp has one Mamba width, so the padded layout, and no clamp of dt at time_step_min);
   - "ours": our elastic forward of the budget as our engines run it (float32, dt clamped, compact).
   Top-1 agreement and max |logit difference| per budget and type; llama.cpp in exact mode (F32 KV
   cache, no flash attention) and, for F32, with its defaults (F16 KV cache, flash attention).
2. llama.cpp's own converter (convert_hf_to_gguf.py of the same source) on our padded slices, and the
   same comparison. What it needed is printed (a tokenizer.json for AutoTokenizer, its SSM head-size key,
   its pre-tokenizer check bypassed, one inert merge so that llama.cpp finds a merges key, the vocab
   padded to a multiple of 8 because its vocab step pads the token list but not the embedding).
3. Decode tokens/s, 1 and 2 threads, same weights: llama.cpp (F32 and Q8_0, its default settings)
   against our torch engine and ONNX Runtime engine (F32), best of --reps interleaved runs, with the
   load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from elastic_export.build import build as onnx_build, load_family  # noqa: E402
from elastic_export.gguf_export import build_gguf, byte_unicode  # noqa: E402
from elastic_export.slicing import slice_budget  # noqa: E402
from elastic_export.tokenizer import ByteTokenizer  # noqa: E402
from engines import llama_cpp  # noqa: E402

# Held out: not in the default model's training data (its recipe trains on generated arithmetic tasks
# and text of the repository); a paragraph written for this benchmark.
HELD_OUT = ("On the night ferry from Rostock the cook counted forty-one crates of pears, nine of plums and one "
            "crate he could not open. Q: 12, +7, *3 -> 57. The harbour lights went out at 04:10; nobody "
            "noticed until the gulls began to complain. Pack 3 boxes of 8: 24 items.")


def unclamped(model):
    for m in model.modules():
        if hasattr(m, "dt_limit"):
            m.dt_limit = (0.0, float("inf"))
    return model


def logits_of(model, ids, subnet=None) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor([ids]), subnet=subnet) if subnet is not None else model(torch.tensor([ids]))
    return (out.logits if hasattr(out, "logits") else out)[0].double()


def compare(got: np.ndarray, ref: torch.Tensor) -> tuple[float, float]:
    g = torch.from_numpy(got).double()[:, :ref.shape[-1]]
    return (g.argmax(-1) == ref.argmax(-1)).double().mean().item(), (g - ref).abs().max().item()


# ---- llama.cpp's own converter ------------------------------------------------------------------

def hf_byte_tokenizer(directory: Path) -> None:
    """tokenizer.json + tokenizer_config.json for AutoTokenizer: our byte-level ids as a byte-level BPE
    without merges (built with the `tokenizers` library)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    bt = ByteTokenizer()
    vocab = {"<pad>": bt.pad_token_id, "<s>": bt.bos_token_id, "</s>": bt.eos_token_id}
    vocab.update({c: 3 + b for b, c in byte_unicode().items()})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))


CONVERT = r"""
import sys
src = sys.argv[1]
sys.path[:0] = [src, src + "/gguf-py"]
import conversion.base as base
# our byte-level BPE has no entry in its table of known pre-tokenizers (it hashes a test string's tokens)
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
# a BPE without merges gets no merges key (the gguf package writes no empty array), which llama.cpp's
# loader requires: add the one inert merge our own writer adds (two control tokens' texts, never symbols)
import conversion.nemotron as nemotron
_set_vocab = nemotron.NemotronHModel.set_vocab
def set_vocab(self):
    _set_vocab(self)
    if "tokenizer.ggml.merges" not in {k for kv in self.gguf_writer.kv_data for k in kv}:
        self.gguf_writer.add_token_merges(["<s> </s>"])
nemotron.NemotronHModel.set_vocab = set_vocab
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[2:]
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""


def run_converter(slice_dir: Path, out: Path, outtype: str) -> str:
    """Convert with llama.cpp's convert_hf_to_gguf.py; returns '' or its last error line."""
    from safetensors.torch import load_file, save_file

    cfg = json.loads((slice_dir / "config.json").read_text())
    cfg["mamba_d_head"] = cfg["mamba_head_dim"]  # its check reads this key (default 64: 'not a multiple')
    # its set_vocab pads the vocab to a multiple of 8 but not token_embd / output, which llama.cpp then
    # refuses ('token_embd.weight has wrong shape'): give it zero rows for ids 259..263 (never scored here)
    V = -(-cfg["vocab_size"] // 8) * 8
    if V != cfg["vocab_size"]:
        st = load_file(str(slice_dir / "model.safetensors"))
        for k in ("backbone.embeddings.weight", "lm_head.weight"):
            if k in st:
                st[k] = torch.cat([st[k], st[k].new_zeros(V - st[k].shape[0], st[k].shape[1])])
        save_file(st, str(slice_dir / "model.safetensors"), metadata={"format": "pt"})
        cfg["vocab_size"] = V
    (slice_dir / "config.json").write_text(json.dumps(cfg))
    hf_byte_tokenizer(slice_dir)
    r = subprocess.run([sys.executable, "-c", CONVERT, str(llama_cpp.build_dir() / "src"), str(slice_dir),
                        "--outfile", str(out), "--outtype", outtype], capture_output=True, text=True)
    return "" if r.returncode == 0 else (r.stderr.strip().splitlines() or ["?"])[-1]


# ---- decode speed ---------------------------------------------------------------------------------

def time_ours(engine, budget, ids, steps):
    engine.set_budget(budget)
    logits = engine.prefill(torch.tensor([ids]), last_only=True)
    tok = torch.as_tensor(logits).argmax(-1)
    for _ in range(3):
        engine.decode(tok)
    t = time.perf_counter()
    for _ in range(steps):
        engine.decode(tok)
    return steps / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    ok, why = llama_cpp.available()
    if not ok:
        sys.exit(f"{why}")
    print("load average before:", os.getloadavg())
    print("llama.cpp:", (llama_cpp.build_dir() / "VERSION").read_text().strip())
    work = Path(tempfile.mkdtemp(prefix="ee-llama-"))
    model, fam, src = load_family(None)
    build_gguf(None, work / "gguf", gguf_types=("f32", "q8_0"))
    tok = ByteTokenizer()
    ids = tok.encode(HELD_OUT, add_bos=True)
    print(f"held-out text: {len(ids)} tokens")

    # 1. logits
    print(f"\n{'budget':<7} {'type':<17} {'top-1 file':>10} {'max|d| file':>11} {'top-1 ours':>10} {'max|d| ours':>11}")
    rows = []
    for n, s in fam.items():
        ref_file = logits_of(unclamped(slice_budget(model, s, layout="padded")).double().eval(), ids)
        ref_ours = logits_of(model.eval(), ids, subnet=s)
        for gt, exact, label in (("f32", True, "f32"), ("f32", False, "f32 (defaults)"), ("q8_0", True, "q8_0")):
            lm = llama_cpp.LlamaCpp(work / "gguf" / f"{n}.{gt}.gguf", threads=1, n_ctx=512, exact=exact)
            assert lm.tokenize(HELD_OUT, add_special=True) == ids, "llama.cpp tokenizes differently"
            got = lm.logits(ids)
            lm.close()
            (a1, d1), (a2, d2) = compare(got, ref_file), compare(got, ref_ours)
            rows.append((n, label, a1, d1, a2, d2))
            print(f"{n:<7} {label:<17} {a1:>10.3f} {d1:>11.2e} {a2:>10.3f} {d2:>11.2e}")

    # 2. llama.cpp's converter on our padded slices
    print("\nllama.cpp's convert_hf_to_gguf.py on `elastic-export slice --layout padded` (tokenizer.json added, "
          "mamba_d_head set, pre-tokenizer check bypassed, one inert merge, vocab padded to 264):")
    for n, s in fam.items():
        d = work / "slices" / n
        slice_budget(model, s, layout="padded").save_pretrained(d)
        ref_file = logits_of(unclamped(slice_budget(model, s, layout="padded")).double().eval(), ids)
        for gt in ("f32", "q8_0"):
            out = work / f"conv-{n}.{gt}.gguf"
            err = run_converter(d, out, gt)
            if err:
                print(f"  {n:<7} {gt:<5} converter failed: {err}")
                continue
            try:
                lm = llama_cpp.LlamaCpp(out, threads=1, n_ctx=512)
                same_tok = lm.tokenize(HELD_OUT, add_special=True)
                got = lm.logits(ids)
                lm.close()
            except RuntimeError as e:
                from gguf import GGUFReader

                f = GGUFReader(str(out)).fields
                arch = f["general.architecture"].contents()
                print(f"  {n:<7} {gt:<5} llama.cpp failed on the converter's file ({e}): it wrote arch {arch}, "
                      f"feed_forward_length {f[arch + '.feed_forward_length'].contents()}")
                continue
            a, m = compare(got, ref_file)
            print(f"  {n:<7} {gt:<5} top-1 {a:.3f}, max|d| {m:.2e} against the file's function; "
                  f"tokenizes as ours: {same_tok[-len(ids) + 1:] == ids[1:]}, {out.stat().st_size / 1e6:.1f} MB")

    # 3. decode tokens/s
    from engines.ort_engine import OrtEngine
    from engines.torch_engine import TorchEngine

    onnx_build(None, work / "onnx", target="onnx")
    prompt = ids[:64]
    table = {}
    for th in args.threads:
        torch.set_num_threads(th)
        te = TorchEngine(model, fam, threads=th)
        oe = OrtEngine(work / "onnx", threads=th)
        lms = {(n, t): llama_cpp.LlamaCpp(work / "gguf" / f"{n}.{t}.gguf", threads=th, n_ctx=512, exact=False)
               for n in fam for t in ("f32", "q8_0")}
        fns = {}
        for n in fam:
            fns[(n, "torch f32")] = lambda n=n: time_ours(te, n, prompt, args.steps)
            fns[(n, "ort f32")] = lambda n=n: time_ours(oe, n, prompt, args.steps)
            for t in ("f32", "q8_0"):
                fns[(n, f"llama.cpp {t}")] = lambda n=n, t=t: lms[(n, t)].generate(prompt, args.steps + 1)[2]
        for _ in range(args.reps):
            for k, fn in fns.items():
                table[(th,) + k] = max(table.get((th,) + k, 0.0), fn())
        for lm in lms.values():
            lm.close()
    engines = ["torch f32", "ort f32", "llama.cpp f32", "llama.cpp q8_0"]
    print(f"\ndecode tokens/s (prompt {len(prompt)}, {args.steps} steps, best of {args.reps} interleaved)")
    print(f"| threads | budget | {' | '.join(engines)} | llama.cpp f32 / best ours |")
    print("|---|---|" + "---|" * (len(engines) + 1))
    for th in args.threads:
        for n in fam:
            v = [table[(th, n, e)] for e in engines]
            print(f"| {th} | {n} | " + " | ".join(f"{x:.0f}" for x in v) + f" | {v[2] / max(v[0], v[1]):.2f}x |")
    print("load average after:", os.getloadavg())
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
