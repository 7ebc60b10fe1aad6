"""The torch engine's static decode: the model's one-token step (model.decode_step) at fixed shapes,
compiled by torch.compile on CPU and captured as one CUDA graph per step on GPU.

A decode step of a small model is launch-bound: hundreds of tiny kernels, each costing more to
launch than to run. Capturing the whole step (embedding, every layer, lm_head, argmax) in a CUDA
graph makes it one launch. A graph replays fixed addresses and shapes, so the step runs on static
buffers (cache.StepState.zeros): conv and SSM states updated in place, the KV cache preallocated to
``max_len`` with the current position as a device tensor and attention masked to the positions
written so far. On CPU inductor fuses the step's many small ops instead. With ``use_graph=False``
and no compilation the same step runs eagerly: the tests check it against the model's own forward.
"""

from __future__ import annotations

import torch

from elastic_export.cache import StepState


class GraphDecoder:
    """``prefill(ids)`` with the model's own forward, then ``step()`` per greedy token.

    ``max_len`` bounds prompt + generated tokens.
    """

    def __init__(self, model, subnet=None, batch: int = 1, max_len: int = 2048, use_graph: bool | None = None,
                 compile: bool = False):
        self.model = model
        self.subnet = model.layer_views(subnet)[0]
        self.plan = model.step_plan(self.subnet)  # views of the one weight copy
        self.batch, self.max_len = batch, max_len
        dev = model.device
        self.use_graph = dev.type == "cuda" if use_graph is None else use_graph
        self.graph = None
        self.state = StepState.zeros(model, self.subnet, batch, max_len)
        self.length = 0
        self.token = torch.zeros(batch, dtype=torch.long, device=dev)  # next input token (in place)
        self.logits = None
        if compile and not self.use_graph:  # CPU: inductor fuses the step's many small ops; its C++
            # wrapper (instead of a Python one) saves ~10% of a small model's step
            self._step = torch.compile(self._step, dynamic=False, options={"cpp_wrapper": True})

    # ---- prefill: the model's forward, then states into the static buffers ------------------------
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                last_only: bool = True) -> torch.Tensor:
        b, l = input_ids.shape
        if b != self.batch or l >= self.max_len:
            raise ValueError(f"prefill of [{b}, {l}] does not fit batch={self.batch}, max_len={self.max_len}")
        cache = self.model.new_cache()
        logits = self.model(input_ids, subnet=self.subnet, cache=cache, attention_mask=attention_mask,
                            last_only=last_only)
        self.state.load(cache)
        self.length = l
        self.token.copy_(logits[:, -1].argmax(-1))
        return logits

    # ---- one static step ----------------------------------------------------------------------
    def _step(self):
        logits = self.model.decode_step(self.token, self.plan, self.state)  # [b, V]
        self.token.copy_(logits.argmax(-1))
        return logits[:, None]

    def _capture(self):
        """Warm up (compiles the Triton kernels) on a snapshot of the state, restore it, capture."""
        st = self.state
        buffers = [t for t in (*st.conv, *st.ssm, *st.k, *st.v) if t is not None] + [st.pos, self.token]
        saved = [t.clone() for t in buffers]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        for t, s in zip(buffers, saved):
            t.copy_(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ``tokens`` [b] (default ``self.token``, the greedy choice so far), return logits [b, 1, V];
        ``self.token`` becomes the next greedy token. No host synchronization."""
        if self.length + 1 > self.max_len:
            raise ValueError(f"max_len={self.max_len} reached")
        if tokens is not None:
            self.token.copy_(tokens.reshape(-1))
        self.length += 1
        if not self.use_graph:
            return self._step()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy: [b, l] -> [b, l + max_new_tokens]."""
        self.prefill(input_ids)
        out = [input_ids, self.token[:, None].clone()]
        for _ in range(max_new_tokens - 1):
            self.step()
            out.append(self.token[:, None].clone())
        return torch.cat(out, dim=1)
