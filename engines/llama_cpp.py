"""llama.cpp over a GGUF file, through the ctypes bindings of llama-cpp-python's source distribution.

``benchmarks/llama_cpp_build.sh`` builds llama.cpp (CPU) from the source vendored in that sdist into a
cache directory: ``$ELASTIC_LLAMA_CPP`` or ``~/.cache/elastic-export/llama.cpp``, holding
``build/bin/libllama.so`` and ``py/llama_cpp/llama_cpp.py`` (the bindings that match that source). No
compiled wheel is installed: the bindings load the library from ``LLAMA_CPP_LIB_PATH``, and only the
``llama_cpp.llama_cpp`` module is imported (the package's ``__init__`` pulls in its high-level API and
its dependencies, which we do not need).

Used by tests/test_gguf.py (logits of our GGUF files against the torch model) and
benchmarks/llama_cpp_compare.py (the same, and decode tokens/s).
"""

from __future__ import annotations

import ctypes
import importlib
import os
import sys
import time
import types
from pathlib import Path

import numpy as np


def build_dir() -> Path:
    return Path(os.environ.get("ELASTIC_LLAMA_CPP") or Path.home() / ".cache" / "elastic-export" / "llama.cpp")


def available() -> tuple[bool, str]:
    """(ok, why not) for the cached llama.cpp build."""
    d = build_dir()
    lib, py = d / "build" / "bin" / "libllama.so", d / "py" / "llama_cpp" / "llama_cpp.py"
    if not lib.is_file() or not py.is_file():
        return False, f"no llama.cpp build in {d} (run: bash benchmarks/llama_cpp_build.sh)"
    return True, ""


_L = None


def bindings():
    """The ``llama_cpp.llama_cpp`` ctypes module of the cached build (loaded once, backend initialized)."""
    global _L
    if _L is not None:
        return _L
    ok, why = available()
    if not ok:
        raise RuntimeError(why)
    d = build_dir()
    os.environ["LLAMA_CPP_LIB_PATH"] = str(d / "build" / "bin")
    if "llama_cpp" not in sys.modules:  # a bare package: importing the submodule skips __init__
        pkg = types.ModuleType("llama_cpp")
        pkg.__path__ = [str(d / "py" / "llama_cpp")]
        sys.modules["llama_cpp"] = pkg
    L = importlib.import_module("llama_cpp.llama_cpp")

    @ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
    def _quiet(level, text, user):  # llama.cpp logs every load at length; keep errors only
        if level >= 4 and text:  # GGML_LOG_LEVEL_ERROR
            sys.stderr.write(text.decode(errors="replace"))

    @L.llama_progress_callback
    def _no_dots(progress, user):  # the default one prints a dot per tensor loaded
        return True

    L._elastic_callbacks = (_quiet, _no_dots)  # keep the callbacks alive
    L.llama_log_set(_quiet, ctypes.c_void_p())
    L.llama_backend_init()
    _L = L
    return L


class LlamaCpp:
    """One GGUF model and context. ``logits(ids)``: [T, V] float32 of one prefill; ``generate``: greedy
    decode, one token per llama_decode call, with its tokens/s.

    ``exact`` (default): an F32 KV cache and no flash attention, so that an F32 file computes in float32
    throughout. llama.cpp's defaults (``exact=False``: F16 KV cache, flash attention where it can) move
    the logits of an F32 model by ~1e-3 relative: its CPU flash attention rounds Q and K to F16 even with
    an F32 cache (measured: 2e-3 against a float64 reference on random tiny models, 7e-7 without it)."""

    def __init__(self, path: str | Path, threads: int = 1, n_ctx: int = 2048, exact: bool = True):
        L = self.L = bindings()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.progress_callback = L._elastic_callbacks[1]
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_ctx, n_ctx, 1
        cp.n_threads = cp.n_threads_batch = threads
        if exact:
            cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
            cp.type_k = cp.type_v = L.GGML_TYPE_F32
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {path}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.batch = L.llama_batch_init(n_ctx, 0, 1)
        self.n_ctx = n_ctx

    def close(self):
        if getattr(self, "ctx", None):
            self.L.llama_batch_free(self.batch)
            self.L.llama_free(self.ctx)
            self.L.llama_model_free(self.model)
            self.ctx = None

    def __del__(self):
        self.close()

    # ---- tokenizer ----
    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        raw = text.encode()
        buf = (self.L.llama_token * (len(raw) + 8))()
        n = self.L.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), add_special, False)
        if n < 0:
            raise RuntimeError(f"llama_tokenize needs {-n} tokens")
        return list(buf[:n])

    def detokenize(self, ids) -> str:
        out = b""
        buf = ctypes.create_string_buffer(64)
        for t in ids:
            n = self.L.llama_token_to_piece(self.vocab, int(t), buf, len(buf), 0, False)
            out += buf.raw[:n]
        return out.decode("utf-8", errors="replace")

    # ---- compute ----
    def reset(self):
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def _decode(self, ids, pos0: int, all_logits: bool):
        b = self.batch
        for j, t in enumerate(ids):
            b.token[j], b.pos[j], b.n_seq_id[j] = int(t), pos0 + j, 1
            b.seq_id[j][0] = 0
            b.logits[j] = all_logits or j == len(ids) - 1
        b.n_tokens = len(ids)
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _row(self, i: int) -> np.ndarray:
        p = self.L.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(p, shape=(self.n_vocab,)).copy()

    def logits(self, ids) -> np.ndarray:
        """[T, V] logits of every position of one prefill of ``ids`` from an empty state."""
        self.reset()
        self._decode(ids, 0, all_logits=True)
        return np.stack([self._row(j) for j in range(len(ids))])

    def generate(self, ids, n_new: int) -> tuple[list[int], float, float]:
        """(greedy tokens, prefill seconds, decode tokens/s): prefill ``ids``, then ``n_new`` one-token steps."""
        self.reset()
        t0 = time.perf_counter()
        self._decode(ids, 0, all_logits=False)
        t1 = time.perf_counter()
        out = [int(self._row(-1).argmax())]
        for k in range(n_new - 1):
            self._decode([out[-1]], len(ids) + k, all_logits=True)
            out.append(int(self._row(-1).argmax()))
        dt = time.perf_counter() - t1
        return out, t1 - t0, (n_new - 1) / dt if n_new > 1 else float("nan")
