"""ONNX Runtime engine over a build directory (see elastic_export/build.py): every budget's prefill and
decode sessions, one copy of the weights in memory.

With ``share_weights`` (the default) the engine reads ``weights.bin`` once into one buffer and hands
each session its weights as zero-copy ``OrtValue`` views (``SessionOptions.add_initializer``); the
graphs only ever read row ranges of stored tensors, so every view is contiguous, and the row ranges
of several budgets overlap in that one buffer (each byte is read once; rows no loaded budget uses are
never read). MatMul weight prepacking is turned off in that mode, since a prepacked weight is a
private copy per session, and all sessions allocate activations from one process-wide arena
(docs/engines.md has the measurements). Without sharing, each session loads its own weights.

A bf16-stored build computing in float32 (ONNX Runtime on a CPU has no bf16 MatMul) reads each
weight through a ``Cast``. Left to itself ONNX Runtime constant-folds every Cast at session creation,
a private float32 copy per session (6 sessions for 3 budgets: 12x the file); without folding it casts
every weight on every call (6x slower decode, and the arena keeps the casts). So with sharing the
engine upcasts once: the buffer holds float32 (twice the file's bytes, one copy for every session),
and each graph is loaded with those initializers retyped float32 and their Casts removed (in memory;
the files are unchanged). That is one weight copy per process, at the compute dtype.

``upcast=False`` keeps such a build's weights as stored instead: the one shared buffer holds the bf16
bytes (the file's size, half the upcast buffer), every graph keeps its Casts, ONNX Runtime's constant
folding is off for those sessions (no folded copy) and so is its arena (which would keep the casts), and
each Cast is made to wait for its consumer's input (``_cast_late``: a Cast that reads only an
initializer is otherwise scheduled at the start, and all of a call's casts are alive at once), so each
call casts the weights it reads into short-lived float32 tensors. The same float32 values go into the
same MatMuls: the logits agree to float32 rounding (tests/test_bf16_build_validate.py); the price is
time (benchmarks/ort_weights_bench.py, docs/RESULTS.md). ``validate`` uses it by default, where memory is
the bound and the numbers are what is judged.
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
from elastic_export.onnx_quant import packed_initializers

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


def _return_large_frees() -> None:
    """Allocations from 1 MiB up are mapped and unmapped on their own (glibc's M_MMAP_THRESHOLD), for the
    whole process: without it glibc raises its threshold after the first large free and keeps every
    freed per-call cast in its heap (100M parameters: +365 MB resident against +238 MB, same speed)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def external_initializers(path: Path, skip_prepacked: bool = False):
    """(name, offset, length, dims, onnx dtype) of each initializer stored in the weight file; with
    ``skip_prepacked``, not those MatMulNBits prepacks (its B and scales), which the session then reads
    from the file itself and frees once packed."""
    return _external(onnx.load(str(path), load_external_data=False), skip_prepacked)


def _external(proto, skip_prepacked: bool = False) -> list:
    packed = packed_initializers(proto) if skip_prepacked else set()
    out = []
    for t in proto.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL and t.name not in packed:
            kv = {e.key: e.value for e in t.external_data}
            out.append((t.name, int(kv.get("offset", 0)), int(kv["length"]), tuple(t.dims), t.data_type))
    return out


def _casts_to_float(n) -> bool:
    return n.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.FLOAT for a in n.attribute)


def _upcast_to_float(proto) -> set[str]:
    """Retype (in ``proto``) each external bfloat16 initializer read only through ``Cast(to=FLOAT)`` as
    float32 and drop those Casts, their consumers reading the initializer instead. Returns the names."""
    ext = {t.name: t for t in proto.graph.initializer
           if t.data_location == TensorProto.EXTERNAL and t.data_type == TensorProto.BFLOAT16}
    users: dict[str, list] = {}
    for n in proto.graph.node:
        for x in n.input:
            if x in ext:
                users.setdefault(x, []).append(n)

    names = {x for x, ns in users.items() if all(_casts_to_float(n) for n in ns)}
    outputs = {o.name for o in proto.graph.output}
    rename = {n.output[0]: n.input[0] for n in proto.graph.node if _casts_to_float(n) and n.input[0] in names}
    if not names or outputs & set(rename):
        return set()
    keep = [n for n in proto.graph.node if not (_casts_to_float(n) and n.input[0] in names)]
    for n in keep:
        n.input[:] = [rename.get(x, x) for x in n.input]
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    for x in names:
        ext[x].data_type = TensorProto.FLOAT
    return names


def _read_bf16_as_f32(path: Path, off: int, dst: np.ndarray, chunk: int = 4 << 20) -> None:
    """bfloat16 values from ``path`` at byte ``off`` into ``dst`` (uint8 bytes of float32), in chunks:
    a float32 is the bfloat16's 16 bits followed by 16 zero bits (exact)."""
    out = dst.view(np.uint32)
    with open(path, "rb") as f:
        f.seek(off)
        for i in range(0, out.size, chunk):
            part = np.frombuffer(f.read(2 * min(chunk, out.size - i)), dtype=np.uint16)
            np.left_shift(part.astype(np.uint32), 16, out=out[i:i + part.size])


def _cast_late(proto) -> int:
    """Make each ``Cast(to=FLOAT)`` of a bf16 initializer run just before its first consumer
    (in ``proto``, in memory). A Cast that reads only an initializer has no data dependency, so ONNX
    Runtime schedules it at the start of the graph and every weight's float32 cast is alive at once (one
    more float32 copy at the call's peak). Here the Cast reads ``Reshape(w, Concat(shape(w), Shape(a,
    0, 0)))``: the same tensor (a view) whose shape waits for ``a``, the consumer's activation input (an
    empty slice of its shape). Returns how many Casts were moved."""
    from onnx import helper, numpy_helper

    g = proto.graph
    dims = {t.name: list(t.dims) for t in g.initializer}
    bf16 = {t.name for t in g.initializer if t.data_type == TensorProto.BFLOAT16}
    consumers: dict[str, int] = {}
    for i, n in enumerate(g.node):
        for x in n.input:
            consumers.setdefault(x, i)
    before: dict[int, list] = {}
    moved, deps, cast_at = 0, {}, set()
    for i, n in enumerate(g.node):
        if not (_casts_to_float(n) and n.input[0] in bf16 and n.output[0] in consumers):
            continue
        c = g.node[consumers[n.output[0]]]
        act = next((x for x in c.input if x and x != n.output[0] and x not in dims), None)
        if act is None:
            continue
        w = n.input[0]
        if act not in deps:
            deps[act] = f"{act}__late_dep"
            before.setdefault(consumers[n.output[0]], []).append(
                helper.make_node("Shape", [act], [deps[act]], start=0, end=0))
        tag = f"{w}__late{moved}"  # one weight may have several Casts
        g.initializer.append(numpy_helper.from_array(np.array(dims[w], dtype=np.int64), f"{tag}_shape"))
        late = helper.make_node("Concat", [f"{tag}_shape", deps[act]], [f"{tag}_shape_dep"], axis=0)
        view = helper.make_node("Reshape", [w, f"{tag}_shape_dep"], [tag])
        cast = copy.deepcopy(n)
        cast.input[0] = tag
        before.setdefault(consumers[n.output[0]], []).extend([late, view, cast])
        cast_at.add(i)
        moved += 1
    nodes = []
    for i, n in enumerate(g.node):
        nodes.extend(before.get(i, []))
        if i not in cast_at:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    return moved


class OrtEngine:
    def __init__(self, build_dir: str | Path, budgets: list[str] | None = None, share_weights: bool = True,
                 threads: int | None = None, preload: bool = True, upcast: bool = True):
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
        stored, compute = self.manifest.get("dtype"), self.manifest.get("compute_dtype", "float32")
        # float32 weights are shared as stored; bf16 ones computing in float32, upcast once (scale 2: each
        # entry at twice its file offset, offsets staying aligned); bf16 compute (a TensorRT build) is not
        # shared: ONNX Runtime on a CPU runs it only through its own casts
        # (upcast=False: bf16 shared as stored, scale 1, the graphs' Casts run per call)
        self._scale = {("float32", "float32"): 1, ("bfloat16", "float32"): 2 if upcast else 1}.get((stored, compute))
        self.share = share_weights and self._scale is not None
        self.cast_per_call = self.share and (stored, compute) == ("bfloat16", "float32") and not upcast
        if self.cast_per_call:
            _return_large_frees()
        # quantized builds (elastic_export.onnx_quant): MatMulNBits is fast only on the weights it prepacks
        # at session creation, a private copy per session, read by the session from the file itself (never
        # into the shared buffer); every other weight is still shared
        self.quant = self.manifest.get("quant")
        self.threads = threads
        self.weights_path = self.dir / self.manifest["weights"]["file"]
        self.buffer = None  # the shared weights (uint8), allocated lazily: pages are touched as budgets load
        self._filled: list[tuple[int, int]] = []  # byte intervals of the buffer read so far, merged
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
            if self.cast_per_call:  # an arena would keep every cast float32 weight: one more copy
                so.enable_cpu_mem_arena = False
            else:
                _shared_allocator(self.ort)
                so.add_session_config_entry("session.use_env_allocators", "1")
        return so

    def _session(self, model, so):
        # casts per call: no constant folding, which would fold each Cast into a float32 copy per session
        off = ["ConstantFolding"] if self.cast_per_call else None
        return self.ort.InferenceSession(model, so, providers=["CPUExecutionProvider"], disabled_optimizers=off)

    def _load(self, name: str) -> dict:
        if name in self.sessions:
            return self.sessions[name]
        sess = {}
        for kind, fname in self.manifest["budgets"][name]["graphs"].items():
            so = self._options()
            if not self.share:
                sess[kind] = self.ort.InferenceSession(str(self.dir / fname), so, providers=["CPUExecutionProvider"])
                continue
            proto = onnx.load(str(self.dir / fname), load_external_data=False)
            upcast = _upcast_to_float(proto) if self._scale == 2 else set()
            late = self.cast_per_call and _cast_late(proto)
            for init, off, length, dims, dt in _external(proto, bool(self.quant)):
                if dt == TensorProto.FLOAT8E4M3FN:  # no OrtValue from a float8 numpy array: the session reads it
                    continue
                as_stored = dt in NP_OF or (self.cast_per_call and dt == TensorProto.BFLOAT16)
                if not as_stored and init not in upcast:
                    raise CheckpointError(f"reads {init!r} as stored ({dt}), not through a Cast to float32",
                                          path=self.dir / fname, fix="rebuild with elastic-export build, or "
                                          "open the engine with share_weights=False")
                if init not in self._values:
                    arr = self._weights(init, off, length, dims, dt, init in upcast)
                    bf16 = dt == TensorProto.BFLOAT16 and init not in upcast  # numpy has no bfloat16: uint16 bits
                    self._values[init] = self.ort.OrtValue.ortvalue_from_numpy_with_onnx_type(arr, dt) if bf16 \
                        else self.ort.OrtValue.ortvalue_from_numpy(arr)
                so.add_initializer(init, self._values[init])
            if upcast or late:  # a graph changed in memory: ONNX Runtime resolves its external data here
                so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.dir))
                sess[kind] = self._session(proto.SerializeToString(), so)
            else:
                sess[kind] = self._session(str(self.dir / fname), so)
        self.sessions[name] = sess
        return sess

    # ---- the one weight buffer -----------------------------------------------------------------
    def _weights(self, init: str, off: int, length: int, dims: tuple, dt: int, upcast: bool) -> np.ndarray:
        """The view of the shared buffer that holds one initializer (bytes [off, off + length) of the
        weight file), read (and for ``upcast``, bfloat16 -> float32) on first use."""
        if self.buffer is None:  # np.empty only reserves: rows that no loaded budget reads are never touched
            self.buffer = np.empty(self.weights_path.stat().st_size * self._scale, dtype=np.uint8)
        s = self._scale
        if upcast:
            dst = self.buffer[s * off:s * off + 2 * length]
        else:
            dst = self.buffer[s * off:s * off + length]
        for a, b in self._gaps(s * off, s * off + dst.nbytes):
            if upcast:
                _read_bf16_as_f32(self.weights_path, off + (a - s * off) // 2, self.buffer[a:b])
            else:
                with open(self.weights_path, "rb") as f:
                    f.seek(off + (a - s * off))
                    f.readinto(memoryview(self.buffer[a:b]))
        elem = np.float32 if upcast else np.uint16 if dt == TensorProto.BFLOAT16 else NP_OF[dt]
        return dst.view(elem).reshape(dims)

    def _gaps(self, a: int, b: int) -> list[tuple[int, int]]:
        """Parts of [a, b) not read yet; marks all of [a, b) as read."""
        gaps, pos = [], a
        for x, y in self._filled:
            if y <= pos or x >= b:
                continue
            if x > pos:
                gaps.append((pos, x))
            pos = max(pos, y)
        if pos < b:
            gaps.append((pos, b))
        merged = []
        for x, y in sorted(self._filled + [(a, b)]):
            if merged and x <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], y))
            else:
                merged.append((x, y))
        self._filled = merged
        return gaps

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
