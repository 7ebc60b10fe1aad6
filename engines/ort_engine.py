"""ONNX Runtime engine over a build directory (see elastic_export/build.py): every budget's prefill and
decode sessions, one copy of the weights in memory.

With ``share_weights`` (the default) the engine reads ``weights.bin`` once into one buffer and hands
each session its weights as zero-copy ``OrtValue`` views (``SessionOptions.add_initializer``); the
graphs only ever read row ranges of stored tensors, so every view is contiguous. MatMul weight
prepacking is turned off in that mode, since a prepacked weight is a private copy per session, and
all sessions allocate activations from one process-wide arena (docs/engines.md has the
measurements). Without sharing, each session loads its own weights.
States stay ``OrtValue`` between decode steps (no numpy round trip).

Two budgets in one generation (engines.schedule, engines.speculative) go through the same methods as
the torch engine: ``fork``, ``extend``, ``rewind``, ``snapshot``, ``restore``. A decode step's states are
fresh ``OrtValue``s, so a snapshot is a reference and a rewind picks the states of an earlier step.
``extend`` runs the decode graph once per token: the prefill graph takes no past states, so the
verification of k drafted tokens costs k + 1 decode steps here rather than one forward (a prefill
graph with ``past.*`` inputs, like the decode graph's, would make it one call).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto

from elastic_export.errors import BudgetError, CheckpointError

from .generation import generate

NP_OF = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.UINT8: np.uint8,
         TensorProto.INT8: np.int8}
_ENV_ALLOCATOR = []


def _shared_allocator(ort) -> None:
    """One CPU arena for every session of the process (activations are not held per session)."""
    if not _ENV_ALLOCATOR:
        mi = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(mi, ort.OrtArenaCfg(0, -1, -1, -1))
        _ENV_ALLOCATOR.append(mi)


def external_initializers(path: Path, skip_prepacked: bool = False):
    """(name, offset, length, dims, onnx dtype) of each initializer stored in the weight file; with
    ``skip_prepacked``, not those MatMulNBits prepacks (its B and scales), which the session then reads
    from the file itself and frees once packed."""
    proto = onnx.load(str(path), load_external_data=False)
    packed = {x for n in proto.graph.node if n.op_type == "MatMulNBits" for x in n.input[1:3]} \
        if skip_prepacked else set()
    out = []
    for t in proto.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL and t.name not in packed:
            kv = {e.key: e.value for e in t.external_data}
            out.append((t.name, int(kv.get("offset", 0)), int(kv["length"]), tuple(t.dims), t.data_type))
    return out


class OrtEngine:
    def __init__(self, build_dir: str | Path, budgets: list[str] | None = None, share_weights: bool = True,
                 threads: int | None = None, preload: bool = True):
        import onnxruntime as ort

        self.ort = ort
        self.dir = Path(build_dir)
        mf = self.dir / "build.json"
        if not mf.is_file():
            raise CheckpointError("is not a build directory (build.json is missing)", path=self.dir,
                                  fix="run elastic-export build first")
        self.manifest = json.loads(mf.read_text())
        if self.manifest.get("target") != "onnx":
            raise CheckpointError(f"holds a {self.manifest.get('target')!r} build, not onnx", path=mf)
        names = list(self.manifest["budgets"])
        for b in budgets or []:
            if b not in names:
                raise BudgetError(f"unknown budget {b!r}", field="budget", fix=f"use one of {names}")
        self._names = budgets or names
        # bf16 builds: ORT on CPU upcasts every weight at load (Cast, constant-folded), so there is no
        # stored buffer to share; each session holds its float32 copy.
        self.share = share_weights and self.manifest["dtype"] == "float32"
        # quantized builds (elastic_export.onnx_quant): MatMulNBits is fast only on the weights it prepacks
        # at session creation, a private copy per session; every other weight is still shared
        self.quant = self.manifest.get("quant")
        self.threads = threads
        wpath = self.dir / self.manifest["weights"]["file"]
        # a quantized build's MatMulNBits weights live in the sessions' prepacked copies: map the file so
        # that only the pages the shared initializers use become resident
        self.buffer = None if not self.share else np.memmap(wpath, dtype=np.uint8, mode="c") if self.quant \
            else np.fromfile(wpath, dtype=np.uint8)
        self._values = {}  # initializer name -> OrtValue view of the buffer (one per name for all sessions)
        self.sessions: dict[str, dict] = {}
        if preload:
            for n in self._names:
                self._load(n)
        self.set_budget(self._names[0])

    @property
    def budgets(self) -> list[str]:
        return list(self._names)

    def _options(self):
        so = self.ort.SessionOptions()
        so.log_severity_level = 3
        if self.threads:
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
        if self.share:
            if not self.quant:
                so.add_session_config_entry("session.disable_prepacking", "1")
            _shared_allocator(self.ort)
            so.add_session_config_entry("session.use_env_allocators", "1")
        return so

    def _load(self, name: str) -> dict:
        if name in self.sessions:
            return self.sessions[name]
        sess = {}
        for kind, fname in self.manifest["budgets"][name]["graphs"].items():
            so = self._options()
            if self.share:
                for init, off, length, dims, dt in external_initializers(self.dir / fname, bool(self.quant)):
                    if dt == TensorProto.FLOAT8E4M3FN:  # no OrtValue from a float8 numpy array: the session reads it
                        continue
                    if init not in self._values:
                        arr = self.buffer[off:off + length].view(NP_OF[dt]).reshape(dims)
                        self._values[init] = self.ort.OrtValue.ortvalue_from_numpy(arr)
                    so.add_initializer(init, self._values[init])
            sess[kind] = self.ort.InferenceSession(str(self.dir / fname), so, providers=["CPUExecutionProvider"])
        self.sessions[name] = sess
        return sess

    def set_budget(self, name: str) -> None:
        if name not in self._names:
            raise BudgetError(f"unknown budget {name!r}", field="budget", fix=f"use one of {self._names}")
        self.budget = name
        s = self._load(name)
        self.prefill_sess, self.decode_sess = s["prefill"], s["decode"]
        self.out_names = [o.name for o in self.decode_sess.get_outputs()]
        self.state_names = [n.removeprefix("present.") for n in self.out_names if n.startswith("present.")]
        self._state_index = {n: self.out_names.index(f"present.{n}") for n in self.state_names}
        self._logits_index = self.out_names.index("logits")
        self.states, self._window = None, None

    def prefill(self, input_ids, attention_mask=None, last_only: bool = False) -> torch.Tensor:
        ids = np.ascontiguousarray(torch.as_tensor(input_ids).numpy(), dtype=np.int64)
        mask = np.ones_like(ids) if attention_mask is None else \
            np.ascontiguousarray(torch.as_tensor(attention_mask).numpy(), dtype=np.int64)
        outs = self.prefill_sess.run_with_ort_values(
            [o.name for o in self.prefill_sess.get_outputs()],
            {"input_ids": self.ort.OrtValue.ortvalue_from_numpy(ids),
             "attention_mask": self.ort.OrtValue.ortvalue_from_numpy(mask)})
        names = [o.name for o in self.prefill_sess.get_outputs()]
        vals = dict(zip(names, outs))
        self.states = {n: vals[f"present.{n}"]._ortvalue for n in self.state_names}
        self.mask = mask
        logits = torch.from_numpy(vals["logits"].numpy())
        return logits[:, -1] if last_only else logits

    def decode(self, tokens) -> torch.Tensor:
        if self.states is None:
            raise BudgetError("decode before prefill", field="decode", fix="call prefill(prompt) first")
        tok = np.ascontiguousarray(torch.as_tensor(tokens).reshape(-1, 1).numpy(), dtype=np.int64)
        self.mask = np.concatenate([self.mask, np.ones((tok.shape[0], 1), np.int64)], axis=1)
        # the binding's own run call: states stay C-level OrtValues, fed straight back next step
        C = self.ort.OrtValue.ortvalue_from_numpy
        feed = {"input_ids": C(tok)._ortvalue, "attention_mask": C(self.mask)._ortvalue}
        for n, v in self.states.items():
            feed[f"past.{n}"] = v
        outs = self.decode_sess._sess.run_with_ort_values(feed, self.out_names, None)
        self.states = {n: outs[j] for n, j in self._state_index.items()}
        self._window = None
        return torch.from_numpy(outs[self._logits_index].numpy()[:, -1])

    def generate(self, input_ids, max_new_tokens: int, **kwargs) -> torch.Tensor:
        return generate(self, input_ids, max_new_tokens, **kwargs)

    # ---- two budgets in one generation: engines.schedule and engines.speculative ------------------
    def fork(self) -> "OrtEngine":
        """Another handle on the same sessions and weight buffer, with its own budget and state."""
        other = copy.copy(self)
        other.states, other._window = None, None
        return other

    def extend(self, input_ids, record: bool = False) -> torch.Tensor:
        """Feed ``input_ids`` [b, l] after the current state -> logits [b, l, V] (l decode steps)."""
        ids = torch.as_tensor(input_ids)
        window = [(self.states, self.mask)]
        logits = []
        for j in range(ids.shape[1]):
            logits.append(self.decode(ids[:, j]))
            window.append((self.states, self.mask))
        self._window = window if record else None
        return torch.stack(logits, 1)

    def rewind(self, keep: int) -> None:
        """Keep the first ``keep`` tokens of the last ``extend(record=True)``."""
        if getattr(self, "_window", None) is None:
            raise BudgetError("rewind without a recorded extend", field="rewind", fix="call extend(ids, record=True)")
        self.states, self.mask = self._window[keep]
        self._window = None

    def snapshot(self):
        return self.budget, self.states, self.mask

    def restore(self, snap) -> None:
        budget, states, mask = snap
        if budget != self.budget:
            self.set_budget(budget)
        self.states, self.mask, self._window = states, mask, None
