"""The backends that validation compares, behind one thin adapter.

A :class:`Backend` has ``name``, ``precision`` ('fp32' or 'bf16'), ``budgets`` (names),
``set_budget(name)``, ``prefill(ids, attention_mask=None) -> logits [B, L, V]``,
``decode(ids [B, 1]) -> logits [B, 1, V]`` (state kept inside since the last prefill) and
``generate(ids, max_new_tokens) -> ids [B, L + n]`` (greedy). Inputs and outputs are torch tensors
(int64 ids, float32 logits) whatever the runtime speaks, so the rest of validation does not know
the runtimes' details.

- ``torch``: the elastic forward of the nested weights (:class:`TorchElastic`): the reference.
  As a backend (not the reference) it checks that cached decode steps match the prefill; it is the
  reference's own computation, so its row is derived from the reference's outputs (:data:`TWIN`).
- ``sliced``: each budget cut into a standalone checkpoint by ``elastic_export.slicing.slice_budget``,
  written and read back (:class:`Sliced`), run with no subnet, one budget held at a time.

Memory (issue 13): every torch backend computes in float32 over the weights *as stored*. A bf16 model
is not copied to float32: :func:`forward_f32` upcasts one layer's views at a time (bf16 -> float32 is
exact, so the logits are those of a float32 copy), at the cost of converting the weights once per
forward call. Backends are built one at a time and closed before the next (:class:`Lazy`).
- ``torch-engine``, ``ort-<mode>``, ``trt``: engines (``engines.*``, issues 5 and 6) wrapped by
  :class:`EngineBackend`; their numpy or torch outputs and logits shapes are normalized here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from elastic_export import elastic
from elastic_export.elastic import Subnet
from elastic_export.errors import BudgetError
from elastic_export.model import forward_masks

from .thresholds import precision_name


@dataclass
class Family:
    """What validation runs on: the nested weights (as a torch model), the budgets and a tokenizer.

    ``model`` holds the full weights in float32 (the reference); each budget is a subnet of it.
    ``engines``: backend name -> (engine factory, precision of its artefacts), e.g. a bf16 ONNX
    build is judged with the bf16 thresholds. ``path``: the nested checkpoint; ``build``: the
    build directory when one was given.
    """
    model: torch.nn.Module
    budgets: dict[str, Subnet]
    tokenizer: object
    path: str | None = None
    build: str | None = None
    engines: dict[str, tuple[Callable[[], object], str]] = field(default_factory=dict)
    threads: int | None = None  # CPU threads for the engines (None: each runtime's default)
    # ONNX Runtime over a bf16 build computing float32: False keeps the weights bf16 and casts per call
    # (one copy at the stored size, slower), True upcasts them once (twice the bytes, fast); same logits
    ort_upcast: bool = False


class Backend:
    """Shared greedy ``generate`` on top of ``prefill``/``decode``; subclasses provide the rest."""
    name = "backend"
    precision = "fp32"
    budgets: list[str] = []

    def set_budget(self, name: str) -> None:
        raise NotImplementedError

    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        out = [ids]
        logits = self.prefill(ids)[:, -1]
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1)[:, None]
            out.append(nxt)
            if step + 1 < max_new_tokens:
                logits = self.decode(nxt)[:, -1]
        return torch.cat(out, dim=1)

    def close(self) -> None:
        pass

    def _check(self, name: str) -> None:
        if name not in self.budgets:
            raise BudgetError(f"unknown budget {name!r} for backend {self.name}", field="budget",
                              fix=f"use one of {self.budgets}")


# ---- float32 arithmetic over weights stored in bf16 -------------------------------------------------

class Upcast:
    """float32 copies of a layer's weight views, written into one reused buffer: a fresh allocation per
    call would cost the page faults of every byte again (3x the copy itself, measured), and the buffer
    never holds more than the largest layer (or LOGIT_ROWS rows of the LM head)."""

    def __init__(self):
        self.buf = torch.empty(0)
        self.pos = 0

    def __call__(self, x, start: bool = True):
        """``x``: a tensor or a (nested) NamedTuple of views -> the same with float32 tensors."""
        if start:
            need = sum(-(-t.numel() // 16) * 16 for t in _leaves(x) if _lower(t))
            if self.buf.numel() < need:
                self.buf = torch.empty(need, device=_device(x))
            self.pos = 0
        if isinstance(x, torch.Tensor):
            if not _lower(x):
                return x
            out = self.buf[self.pos:self.pos + x.numel()].view(x.shape)
            self.pos += -(-x.numel() // 16) * 16  # 64-byte aligned
            return out.copy_(x)
        if isinstance(x, tuple):
            items = [self(t, start=False) for t in x]
            return type(x)(*items) if hasattr(x, "_fields") else tuple(items)
        return x


def _lower(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float32


def _leaves(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, tuple):
        for t in x:
            yield from _leaves(t)


def _device(x):
    return next(iter(_leaves(x))).device


LOGIT_ROWS = 8192  # vocabulary rows of the LM head upcast at a time


def upcast_fits(model) -> bool:
    """Whether :func:`forward_f32` can run ``model``: every tensor its layers read comes through their
    views (a Mamba input-projection bias is read from the module itself)."""
    return not model.config.mamba_proj_bias


@torch.no_grad()
def forward_f32(model, input_ids: torch.Tensor, subnet: Subnet | None = None, cache=None,
                attention_mask: torch.Tensor | None = None, upcast: Upcast | None = None) -> torch.Tensor:
    """``model(input_ids, subnet, cache, attention_mask)`` computed in float32 whatever the stored dtype:
    the model's own layers (``apply_layer``) on float32 copies of one layer's weight views at a time,
    the LM head LOGIT_ROWS rows at a time. Memory: the stored weights plus one layer in float32 (in
    ``upcast``'s buffer, reused from call to call)."""
    up = upcast or Upcast()
    subnet, views = model.layer_views(subnet)
    d = subnet.hidden
    key_mask, new_mask = forward_masks(input_ids, cache, attention_mask)  # as the model's own forward
    h = F.embedding(input_ids, elastic.embedding_view(model.backbone.embeddings.weight, d)).float()
    for i, v in enumerate(views):
        if v is not None:
            h = model.apply_layer(i, h, up(v), cache, new_mask, key_mask)
    if cache is not None:
        cache.advance(input_ids.shape[1])
    h = model.final_norm(h)
    W = elastic.embedding_view(model.lm_head_weight, d)  # [V, d]
    return torch.cat([F.linear(h, up(W[r:r + LOGIT_ROWS])) for r in range(0, W.shape[0], LOGIT_ROWS)], dim=-1)


class TorchElastic(Backend):
    """The elastic forward over views of the one weight copy (the reference when float32).

    ``dtype`` is the arithmetic. float32 over a model stored otherwise runs :func:`forward_f32` (no
    float32 copy of the weights); another dtype runs the model as stored (``model.dtype``)."""

    def __init__(self, model, budgets: dict[str, Subnet], name: str = "torch", dtype=torch.float32):
        self.upcast = dtype == torch.float32 and model.dtype != torch.float32 and upcast_fits(model)
        self.model = (model if model.dtype == dtype or self.upcast else copy.deepcopy(model).to(dtype)).eval()
        self.subnets = dict(budgets)
        self.budgets = list(budgets)
        self.name = name
        self.precision = precision_name(dtype)
        self.subnet = None
        self.cache = None

    def set_budget(self, name: str) -> None:
        self._check(name)
        self.subnet = self.subnets[name]
        self.cache = None

    def _forward(self, ids, attention_mask=None):
        if self.upcast:
            if getattr(self, "_upcast", None) is None:
                self._upcast = Upcast()
            return forward_f32(self.model, ids, self.subnet, self.cache, attention_mask, self._upcast)
        return self.model(ids, subnet=self.subnet, cache=self.cache, attention_mask=attention_mask).float()

    @torch.no_grad()
    def prefill(self, ids, attention_mask=None):
        self.cache = self.model.new_cache()
        return self._forward(ids, attention_mask)

    @torch.no_grad()
    def decode(self, ids):
        return self._forward(ids)


class Sliced(TorchElastic):
    """Each budget as a standalone checkpoint (``slice_fn(model, subnet)``), one held at a time.

    ``via_disk``: write the slice with ``save_pretrained`` and read it back with
    ``elastic_export.load``, so the checkpoint users get (HF head order, config) is what runs. The slice
    stays at the parent's stored dtype; ``dtype`` is the arithmetic, as for :class:`TorchElastic`.
    :meth:`write_all` cuts every budget to disk first (one in memory at a time) and lets go of the
    parent: from then on the backend holds one slice and nothing else (validate frees the parent's
    weights in between). Otherwise each budget is cut when set: the parent plus one slice.
    """

    def __init__(self, model, budgets: dict[str, Subnet], slice_fn: Callable | None = None, name: str = "sliced",
                 dtype=torch.float32, via_disk: bool = True):
        super().__init__(model, budgets, name, dtype)
        self.slice_fn = slice_fn  # None: the package's slicer, written tensor by tensor (slicing.save_slice)
        self.parent = self.model
        self.dtype = dtype
        self.via_disk = via_disk
        self._dir = None  # a TemporaryDirectory holding every budget's slice, after write_all()

    def _write(self, name: str, root: str) -> None:
        if self.slice_fn is None:  # streamed from the parent's views: no sliced model beside the parent
            from elastic_export.slicing import save_slice

            save_slice(self.parent, self.subnets[name], f"{root}/{name}")
        else:
            model = self.slice_fn(self.parent, self.subnets[name])
            model.save_pretrained(f"{root}/{name}")
            del model
        release_memory()

    def write_all(self) -> "Sliced":
        import tempfile

        self._dir = tempfile.TemporaryDirectory(prefix="ee-validate-slices-")
        for name in self.subnets:
            self._write(name, self._dir.name)
        self.model = self.parent = None
        return self

    def set_budget(self, name: str) -> None:
        self._check(name)
        self.model = self.parent  # drop the previous budget's slice before the next
        release_memory()
        if self._dir is not None or self.via_disk:
            import tempfile

            from elastic_export import load

            if self._dir is not None:
                model = load(f"{self._dir.name}/{name}")
            else:
                with tempfile.TemporaryDirectory(prefix="ee-validate-slice-") as tmp:
                    self._write(name, tmp)
                    model = load(f"{tmp}/{name}")
        else:
            if self.slice_fn is None:
                from elastic_export.slicing import slice_budget

                model = slice_budget(self.parent, self.subnets[name])
            else:
                model = self.slice_fn(self.parent, self.subnets[name])
        self.upcast = self.dtype == torch.float32 and model.dtype != torch.float32 and upcast_fits(model)
        self.model = (model if model.dtype == self.dtype or self.upcast else model.to(self.dtype)).eval()
        self.subnet = None
        self.cache = None

    def close(self) -> None:
        self.model = self.parent = self._upcast = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc keeps them otherwise, and a
    freed slice or weight buffer would still count as resident)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


TWIN = "torch"  # the backend that is the reference's own computation (see run_parity)


@dataclass
class Lazy:
    """A backend built when its turn comes (``make()``) and closed after its last budget, so that
    validation holds one backend at a time. ``make`` None: the reference's twin (:data:`TWIN`)."""
    name: str
    precision: str
    make: Callable[[], "Backend"] | None


class EngineBackend(Backend):
    """An engine of the build package (ONNX Runtime, TensorRT, torch engine) seen through torch tensors.

    The engine interface (issue 5): ``budgets``, ``set_budget(name)``, ``prefill(input_ids,
    attention_mask=None)``, ``decode(token_ids)`` (logits [B, V] or [B, 1, V]),
    ``generate(ids, max_new_tokens)``. Torch tensors go in (engines take them through
    ``torch.as_tensor`` / ``np.asarray``); numpy or torch may come out.
    """

    def __init__(self, engine, name: str, precision: str = "fp32"):
        self.engine = engine
        self.name = name
        self.precision = precision
        self.budgets = list(engine.budgets)

    def set_budget(self, name: str) -> None:
        self._check(name)
        self.engine.set_budget(name)

    @staticmethod
    def _out(x) -> torch.Tensor:
        return torch.as_tensor(x).float().cpu()

    def prefill(self, ids, attention_mask=None):
        if attention_mask is None:  # not every engine takes a mask (TensorRT's does not)
            return self._out(self.engine.prefill(ids))
        return self._out(self.engine.prefill(ids, attention_mask=attention_mask))

    def decode(self, ids):
        out = self._out(self.engine.decode(ids))
        return out[:, None] if out.dim() == 2 else out  # engines return [B, V] or [B, 1, V]

    def generate(self, ids, max_new_tokens):
        gen = getattr(self.engine, "generate", None)
        if gen is None:
            return super().generate(ids, max_new_tokens)
        return torch.as_tensor(gen(ids, max_new_tokens)).long().cpu()

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()


# ---- which backends exist here -------------------------------------------------------------------

def slicing_available() -> bool:
    try:
        from elastic_export.slicing import slice_budget  # noqa: F401
        return True
    except ImportError:
        return False


def available(family: Family) -> list[str]:
    """Backend names that can run on this machine for this family, in comparison order."""
    names = ["torch"]
    if slicing_available():
        names.append("sliced")
    names += list(family.engines)
    return names


def make_backend(name: str, family: Family) -> Backend:
    """Construct one backend by name (see :func:`available`)."""
    if name == TWIN:
        return TorchElastic(family.model, family.budgets)
    if name == "sliced":
        if not slicing_available():
            raise BudgetError("the sliced backend needs elastic_export.slicing (not installed)", field="--backends")
        return Sliced(family.model, family.budgets)
    if name in family.engines:
        factory, precision = family.engines[name]
        return EngineBackend(factory(), name, precision)
    raise BudgetError(f"backend {name!r} is not available here", field="--backends",
                      fix=f"use some of {available(family)}")


def reference(family: Family) -> TorchElastic:
    """The float32 elastic forward of the nested weights: what every backend is compared with."""
    return TorchElastic(family.model, family.budgets, name="reference", dtype=torch.float32)
