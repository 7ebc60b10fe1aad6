"""Torch engine: every budget of a nested model from its one weight copy, instant budget switch.

Prefill is the elastic forward (model.py). Decode is the model's one-token step (model.decode_step)
over the same weight views (elastic.*_views, cached per budget by the model), on states updated in
place: dynamic (the prefill's cache, the KV cache grown by doubling) or static (buffers preallocated
to ``max_len``, a fixed-shape step compiled on CPU or replayed as a CUDA graph: cuda_graph_decode).
Its numerics are checked against the elastic forward (tests/test_engines.py, test_decode_step.py).
Two budgets in one generation (engines.schedule, engines.speculative) use ``fork`` (a second handle on
the same weights with its own state), ``extend`` (a multi-token forward continuing the state),
``rewind`` (drop a suffix of the last extend) and ``snapshot``/``restore``.
Weights run at their stored dtype (bf16 compute where the CPU has it; SSM state and norms in float32
as in the model).
"""

from __future__ import annotations

import copy

import torch

from elastic_export.cache import InferenceCache, StepState
from elastic_export.elastic import Subnet, validate_subnet
from elastic_export.errors import BudgetError

from .generation import generate


class TorchEngine:
    """``budgets``: name -> Subnet, largest first. Tensors in and out are torch (logits float32)."""

    def __init__(self, model, budgets: dict[str, Subnet], threads: int | None = None, static: bool = False,
                 max_len: int = 4096):
        """``static=True`` decodes on preallocated states of ``max_len`` tokens with a fixed-shape step:
        compiled by torch.compile on CPU, replayed as a CUDA graph on GPU (engines.cuda_graph_decode).
        The first decode of each budget and batch size pays the compilation (seconds). A quantized
        model's compiled step dequantizes its layers (torch.compile does not trace the int4 kernel's
        views, elastic_export.qkernels), so ``static`` turns that model's int4 kernel off."""
        if not budgets:
            raise BudgetError("no budgets to serve", field="budgets")
        for name, s in budgets.items():
            validate_subnet(model.config, s, where=f"budget {name}")
        if model.dtype not in (torch.float32, torch.bfloat16):
            raise BudgetError(f"the torch engine runs float32 or bfloat16 weights, not {model.dtype}",
                              field="dtype", fix="load the model with dtype float32 or bfloat16")
        if static and getattr(model, "use_kernel", False):
            model.use_kernels(False)
        self.model = model.eval()
        self.cfg = model.config
        self._subnets = dict(budgets)
        self.threads = threads
        self.static, self.max_len = static, max_len
        self._static: dict[tuple[str, int], object] = {}  # (budget, batch) -> GraphDecoder
        self._dec = self._cache = None
        self.set_budget(next(iter(budgets)))

    @property
    def budgets(self) -> list[str]:
        return list(self._subnets)

    def set_budget(self, name: str) -> None:
        if name not in self._subnets:
            raise BudgetError(f"unknown budget {name!r}", field="budget", fix=f"use one of {self.budgets}")
        self.budget, self.subnet = name, self._subnets[name]
        with torch.no_grad():
            self.views = self.model.layer_views(self.subnet)[1]  # views of the one weight copy (cached)
        self.plan = self.model.step_plan(self.subnet)
        self.state = None
        self._dec = self._cache = None

    def _threads(self):
        if self.threads is not None and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    # ---- prefill ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Run the prompt [b, l]; keep its states for decode. Returns logits [b, l, V] (or [b, V])."""
        self._threads()
        input_ids = torch.as_tensor(input_ids)
        if self.static:
            return self._static_prefill(input_ids, attention_mask, last_only)
        cache = self.model.new_cache()
        logits = self.model(input_ids, subnet=self.subnet, cache=cache, attention_mask=attention_mask,
                            last_only=last_only)
        self.state = StepState.from_cache(cache, device=self.model.device)  # updated in place by decode
        self.length = cache.seen
        self._dec = self._cache = None
        return logits[:, -1] if last_only else logits

    # ---- decode ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One new token per sequence ([b] or [b, 1]) -> logits [b, V] float32."""
        if self.state is None and self._dec is None:
            raise BudgetError("decode before prefill", field="decode", fix="call prefill(prompt) first")
        self._threads()
        if self._dec is not None:
            return self._dec.step(torch.as_tensor(tokens))[:, -1]
        tok = torch.as_tensor(tokens).reshape(-1).to(self.model.device)
        self.state.reserve(self.length + 1)
        logits = self.model.decode_step(tok, self.plan, self.state, length=self.length)
        self.length += 1
        self._cache = None
        return logits

    # ---- two budgets in one generation: engines.schedule and engines.speculative ------------------
    def fork(self) -> "TorchEngine":
        """Another handle on the same model (one weight copy), with its own budget and state."""
        if self.static:
            raise BudgetError("budget schedules and speculative decoding run the dynamic decode", field="static",
                              fix="use TorchEngine(..., static=False)")
        other = copy.copy(self)
        other.state, other._dec, other._cache = None, None, None
        return other

    @torch.inference_mode()
    def extend(self, input_ids: torch.Tensor, record: bool = False) -> torch.Tensor:
        """Feed ``input_ids`` [b, l] after the current state in one forward -> logits [b, l, V].
        ``record``: keep what ``rewind`` needs to drop a suffix of these tokens afterwards."""
        if self.state is None:
            raise BudgetError("extend before prefill", field="extend", fix="call prefill(prompt) first")
        self._threads()
        cache = InferenceCache.from_step_state(self.state, self.length)
        if record:
            cache.record()
        logits = self.model(torch.as_tensor(input_ids).to(self.model.device), subnet=self.subnet, cache=cache)
        self._adopt(cache)
        self._cache = cache if record else None
        return logits

    @torch.inference_mode()
    def rewind(self, keep: int) -> None:
        """Keep the first ``keep`` tokens of the last ``extend(record=True)`` (no decode in between)."""
        if getattr(self, "_cache", None) is None:
            raise BudgetError("rewind without a recorded extend", field="rewind", fix="call extend(ids, record=True)")
        self._cache.rewind(keep)
        self._adopt(self._cache)
        self._cache = None

    def _adopt(self, cache: InferenceCache) -> None:
        self.state = StepState.from_cache(cache, device=self.model.device)
        self.length = cache.seen

    def snapshot(self):
        """The current state, restorable later: conv and SSM states copied (decode updates them in
        place), the KV buffers shared (decode only appends to them, so the prefix stays valid while at
        most one state grown from this snapshot is in use at a time)."""
        st = self.state
        clone = [None if t is None else t.clone() for t in (*st.conv, *st.ssm)]
        n = len(st.conv)
        return self.budget, self.length, clone[:n], clone[n:], list(st.k), list(st.v), st.key_valid

    def restore(self, snap) -> None:
        budget, length, conv, ssm, k, v, key_valid = snap
        if budget != self.budget:
            self.set_budget(budget)
        conv, ssm = [None if t is None else t.clone() for t in conv], [None if t is None else t.clone() for t in ssm]
        self.state = StepState(conv, ssm, list(k), list(v), length, key_valid, self.model.device)
        self.length = length
        self._cache = None

    def _static_prefill(self, input_ids, attention_mask, last_only):
        from .cuda_graph_decode import GraphDecoder

        key = (self.budget, input_ids.shape[0])
        if key not in self._static:
            self._static[key] = GraphDecoder(self.model, self.subnet, batch=input_ids.shape[0], max_len=self.max_len,
                                             compile=self.model.device.type == "cpu")
        self._dec = self._static[key]
        logits = self._dec.prefill(input_ids, attention_mask, last_only=last_only)
        return logits[:, -1] if last_only else logits

    def generate(self, input_ids, max_new_tokens: int, **kwargs) -> torch.Tensor:
        return generate(self, input_ids, max_new_tokens, **kwargs)
