"""TrtEngine: run built TensorRT engines with the engine interface (budgets, set_budget, prefill,
decode, generate). States stay on the GPU between steps: present states of one call are torch CUDA
tensors handed to the next call as its past states, without a host round trip.

I/O naming (the exporter's, elastic_export/onnx_export.py, shared with engines/cpp/): ``input_ids``
[b, l] and ``attention_mask`` in, ``logits`` [b, l, V] out; every other input ``past.<name>`` pairs
with the output ``present.<name>`` (``_`` is accepted in place of ``.``). ``attention_mask`` is
[b, l] for prefill and [b, T] for decode, T = all tokens so far (past + 1): the engine keeps it on
the device and appends a 1 per decode step. A graph without past inputs is prefill-only and must
come with a decode graph; a graph with past inputs serves both, past length 0 for prefill (engine
profiles ``prefill`` and ``decode``, see builder.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .builder import MANIFEST

PAST, PRESENT = ("past_", "past."), ("present_", "present.")
INPUT_IDS, ATTENTION_MASK = "input_ids", "attention_mask"


def _stream(device: torch.device) -> int:
    """The CUDA stream handle TensorRT enqueues on (the current torch stream; 0 off CUDA)."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def state_pairs(inputs: list[str], outputs: list[str]) -> dict[str, str]:
    """Past input name -> present output name, by shared suffix. Raises on an unpaired past input."""
    presents = {}
    for o in outputs:
        for pre in PRESENT:
            if o.startswith(pre):
                presents[o[len(pre):]] = o
    pairs = {}
    for i in inputs:
        for pre in PAST:
            if i.startswith(pre):
                suffix = i[len(pre):]
                if suffix not in presents:
                    raise ValueError(f"engine input {i!r} has no matching output 'present_{suffix}'")
                pairs[i] = presents[suffix]
    return pairs


def _torch_dtype(trt_dtype):
    import tensorrt as trt

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int32: torch.int32, trt.int64: torch.int64, trt.int8: torch.int8, trt.bool: torch.bool}
    return table[trt_dtype]


class _Runner:
    """One deserialized engine with one execution context per optimization profile."""

    def __init__(self, runtime, path: Path, profile_names: list[str], device: torch.device):
        import tensorrt as trt

        self.device = device
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {path} (built by another TensorRT version, "
                               "or the plugin was not registered)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.pairs = state_pairs(self.inputs, self.outputs)
        unknown = set(self.inputs) - set(self.pairs) - {INPUT_IDS, ATTENTION_MASK}
        if unknown:
            raise ValueError(f"{path}: inputs {sorted(unknown)} are neither input_ids, attention_mask nor "
                             "past.* states")
        self.contexts = {}
        stream = _stream(device)
        for i, name in enumerate(profile_names or ["default"]):
            ctx = self.engine.create_execution_context()
            if self.engine.num_optimization_profiles > 1:
                ctx.set_optimization_profile_async(i, stream)
            self.contexts[name] = ctx

    def run(self, profile: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ctx = self.contexts.get(profile) or next(iter(self.contexts.values()))
        for name in self.inputs:
            t = feeds[name]
            want = _torch_dtype(self.engine.get_tensor_dtype(name))
            if t.dtype != want or not t.is_contiguous():
                t = feeds[name] = t.to(want).contiguous()
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=_torch_dtype(self.engine.get_tensor_dtype(name)),
                                     device=self.device)
            ctx.set_tensor_address(name, outs[name].data_ptr())
        if not ctx.execute_async_v3(_stream(self.device)):
            raise RuntimeError("TensorRT execution failed (see the log)")
        return outs


class TrtEngine:
    """All budgets of a TensorRT build directory (``trt_manifest.json`` from builder.build_family)."""

    def __init__(self, build_dir: str | Path, budget: str | None = None, device: str | torch.device = "cuda"):
        import tensorrt as trt

        from .plugin import register

        register()  # JIT-plugin engines need the Python definitions; AOT ones do not, harmless
        self.dir = Path(build_dir)
        manifest_path = self.dir / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path} not found: build with --target trt first")
        self.manifest = json.loads(manifest_path.read_text())
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.device = torch.device(device)  # "cpu" only with a stand-in runtime (tests)
        self._runners: dict[str, dict[str, _Runner]] = {}
        for name, kinds in self.manifest["budgets"].items():
            self._runners[name] = {kind: _Runner(self._runtime, self.dir / e["file"], list(e.get("profiles", {})),
                                                 self.device)
                                   for kind, e in kinds.items()}
        self._budget = budget or next(iter(self._runners))
        self.states: dict[str, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None
        self.set_budget(self._budget)

    # ---- interface -------------------------------------------------------------------------------
    @property
    def budgets(self) -> list[str]:
        return list(self._runners)

    @property
    def budget(self) -> str:
        return self._budget

    def set_budget(self, name: str) -> None:
        """Switch budget (engines are all loaded: no reload, no copy). Drops the current states."""
        if name not in self._runners:
            raise KeyError(f"unknown budget {name!r}; this build has {self.budgets}")
        self._budget = name
        self.states = {}
        self.mask = None

    def _runner(self, kind: str) -> tuple[_Runner, str]:
        runners = self._runners[self._budget]
        if "model" in runners:
            return runners["model"], kind
        return runners[kind], kind

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """[b, l] token ids (and an optional [b, l] mask, 0 = left padding) -> logits [b, l, V] (or
        [b, V] with ``last_only``); the states and the mask stay on the device for decode."""
        runner, profile = self._runner("prefill")
        ids = torch.as_tensor(input_ids).to(self.device, torch.int64)
        mask = torch.ones_like(ids) if attention_mask is None else \
            torch.as_tensor(attention_mask).to(self.device, torch.int64)
        feeds = {INPUT_IDS: ids}
        if ATTENTION_MASK in runner.inputs:
            feeds[ATTENTION_MASK] = mask
        b = ids.shape[0]
        for past in runner.pairs:  # unified graph: empty past states (length 0 on the dynamic axis)
            feeds[past] = self._empty_state(runner, past, b)
        outs = runner.run(profile, feeds)
        self.states = {self._suffix(o): outs[o] for o in runner.pairs.values()} if runner.pairs else \
            {self._suffix(o): t for o, t in outs.items() if o != "logits"}
        self.mask = mask
        logits = outs["logits"]
        return logits[:, -1] if last_only else logits

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """[b] or [b, 1] next tokens -> logits [b, V]; advances the states and the mask on the device."""
        if not self.states:
            raise RuntimeError("decode before prefill: call prefill(input_ids) first")
        runner, profile = self._runner("decode")
        ids = torch.as_tensor(tokens).reshape(-1, 1).to(self.device, torch.int64)
        # the new token is real: the mask grows by one column, over all T = past + 1 tokens
        self.mask = torch.cat([self.mask, torch.ones_like(ids)], dim=1)
        feeds = {INPUT_IDS: ids}
        if ATTENTION_MASK in runner.inputs:
            feeds[ATTENTION_MASK] = self.mask
        for past, present in runner.pairs.items():
            feeds[past] = self.states[self._suffix(present)]
        outs = runner.run(profile, feeds)
        self.states = {self._suffix(o): outs[o] for o in runner.pairs.values()}
        return outs["logits"][:, -1]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask=None, **sampling) -> torch.Tensor:
        """[b, l] -> [b, l + new] token ids (on the CPU, as the other engines). Greedy stays on the
        device (the token is fed back without a host round trip); see elastic_export.generate.decode_loop."""
        from elastic_export.generate import decode_loop

        input_ids = torch.as_tensor(input_ids).to(self.device, torch.int64)
        logits = self.prefill(input_ids, attention_mask, last_only=True)
        new = decode_loop(logits.float(), lambda tok: self.decode(tok).float(), max_new_tokens, **sampling)
        return torch.cat([input_ids, *new], dim=1).cpu()

    # ---- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _suffix(name: str) -> str:
        for pre in PAST + PRESENT:
            if name.startswith(pre):
                return name[len(pre):]
        return name

    def _empty_state(self, runner: _Runner, name: str, batch: int) -> torch.Tensor:
        """A past state for prefill: batch on axis 0, 0 on dynamic axes (KV length), static dims kept."""
        dims = list(runner.engine.get_tensor_shape(name))
        shape = [batch if i == 0 else (0 if d < 0 else d) for i, d in enumerate(dims)]
        return torch.zeros(shape, dtype=_torch_dtype(runner.engine.get_tensor_dtype(name)), device=self.device)
