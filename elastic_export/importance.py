"""Importance of every elastic axis from calibration forward passes (no gradients).

Width scores (one pass over the calibration data, hooks on each mixer's input X = RMSNorm(h)):
- embedding channel i (Eq. 1): sum over batch and sequence of |RMSNorm(h)|_i, summed over every
  layer's pre-norm and the final norm;
- FFN neuron i (Eq. 2): sum over batch and sequence of |X W1_i^T| (the up projection's output);
- Mamba (Eqs. 3/4): s = X W_x^T (the x part of in_proj) viewed [H, P]; S = sum over batch and
  sequence of s (signed, as Eq. 3 writes it). Channel score s_p = ||S[:, p]||_2 across heads; head
  score f_h = ||S[h, D_top]||_2 over the top ``head_channels`` channels (all channels by default).
  Heads are ranked inside their group later (sorting.py), so a head never changes group;
- attention query head h: sum over batch and sequence of ||softmax(q_h k_g^T / sqrt(hd)) v_g||_2,
  its output before o_proj (g = its KV group); ranked inside its KV group later;
- MoE routed expert j (REAP, Lasby et al. 2025, "router-weighted expert activation pruning"):
  S_j = 1/|X_j| * sum_{x in X_j} g_j(x) * ||f_j(x)||_2, where X_j is the set of calibration tokens
  whose top-k choice includes j, g_j(x) the gate weight the layer multiplies expert j's output by
  (normalized over the chosen experts when norm_topk_prob, times routed_scaling_factor: a common
  factor, it does not change the ranking) and f_j(x) = down_j(act(up_j(u))) the expert's output
  (u = x, or fc1_latent_proj(x) for a latent MoE: the norm is taken in the experts' own width). An
  expert no token chose scores 0. Experts are ranked inside their routing group later (sorting.py);
- MoE expert neuron i of expert j: sum over the tokens routed to j of |u W_up,j,i^T| (its up
  projection's output, as Eq. 2 for MLP neurons), ungated; shared-expert neuron i: Eq. 2 over all
  tokens.

Depth (Eq. 5): s_j = sum (M_full - M_-j)^2 / sum M_full^2 over the calibration logits M, with layer
j skipped. ``iterative``: remove the lowest-scoring layer, re-score the rest with it removed (always
against the parent's logits M_full), repeat; the score kept for a layer is its score when removed.
``depth_order`` lists layers from least to most important: a budget dropping k layers drops the
first k. The prefix is not recomputed per layer: one pass keeps the residual stream h_j before each
layer j and M_-j runs layers j+1.. from h_j (half the layer work of a full forward per layer), batch
by batch, so one batch's L residual streams and logits are the peak memory.

Calibration data: token files (.npy of ids; .bin of raw little-endian ids, uint16 when the vocab
fits in 16 bits, else uint32; .txt of whitespace-separated integers) or text files (any other
content, tokenized; the byte-level tokenizer unless one is given). Streams are concatenated and cut
into windows of ``seq_len`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .elastic import LayerWidths, Subnet, embedding_view, full_subnet, group_members, moe_views
from .errors import ConfigError

DEPTH_MODES = ("oneshot", "iterative", "none")
PAPER_CALIB_TOKENS = 1024 * 8192  # the paper's calibration set: 1024 windows of 8192 tokens


def compute_device(name: str) -> torch.device:
    """The device the calibration passes run on; CUDA only where torch sees a GPU."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {name!r}", field="--device", fix="use cpu or cuda[:N]") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("asks for CUDA, but torch sees no CUDA GPU on this machine", field="--device",
                              fix="run on a machine with a GPU and a CUDA build of torch, or use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"asks for GPU {dev.index}, but torch sees {torch.cuda.device_count()}",
                              field="--device", fix="use an index below the GPU count")
    elif dev.type != "cpu":
        raise ConfigError(f"device {name!r} is not supported", field="--device", fix="use cpu or cuda[:N]")
    return dev


# ---- calibration data ---------------------------------------------------------------------------

def _read_ids(path: Path, vocab_size: int, tokenizer) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            ids = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ConfigError(f"is not a readable .npy file ({e})", path=path) from None
        if not np.issubdtype(ids.dtype, np.integer):
            raise ConfigError(f"holds {ids.dtype} values, expected integer token ids", path=path)
        return ids.reshape(-1).astype(np.int64)
    if suffix == ".bin":
        dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
        raw = path.read_bytes()
        if len(raw) % np.dtype(dtype).itemsize:
            raise ConfigError(f"has {len(raw)} bytes, not a whole number of {np.dtype(dtype).name} ids", path=path,
                              fix="write token ids as raw little-endian uint16 (uint32 for vocab > 65536)")
        return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(np.int64)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError("is neither a token file (.npy, .bin) nor UTF-8 text", path=path) from None
    words = text.split()
    if suffix == ".txt" and words and all(w.isdigit() for w in words):
        return np.array([int(w) for w in words], dtype=np.int64)
    if tokenizer is None:
        from .tokenizer import ByteTokenizer
        tokenizer = ByteTokenizer()
    return np.array(tokenizer.encode(text), dtype=np.int64)


def load_calibration(paths, vocab_size: int, seq_len: int = 256, num_samples: int | None = None,
                     tokenizer=None) -> torch.Tensor:
    """Token windows [n, seq_len] from token or text files (directories: every file inside)."""
    files: list[Path] = []
    for p in [paths] if isinstance(paths, (str, Path)) else paths:
        p = Path(p)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError("calibration file not found", path=p, fix="give token files (.npy/.bin/.txt) or text")
    if not files:
        raise ConfigError("no calibration files given", field="--calib")
    if seq_len < 2:
        raise ConfigError(f"sequence length {seq_len} is too short", field="seq_len", fix="use at least 2")
    streams = []
    for f in files:
        ids = _read_ids(f, vocab_size, tokenizer)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ConfigError(f"holds token id {int(ids.max() if ids.max() >= vocab_size else ids.min())} outside "
                              f"the model's vocabulary 0..{vocab_size - 1}", path=f,
                              fix="tokenize with the model's tokenizer")
        streams.append(ids)
    ids = np.concatenate(streams)
    n = ids.size // seq_len
    if n == 0:
        raise ConfigError(f"calibration data holds {ids.size} tokens, fewer than one window of {seq_len}",
                          field="--calib", fix="give more data or a shorter --seq-len")
    if num_samples is not None:
        n = min(n, num_samples)
    return torch.from_numpy(ids[:n * seq_len].reshape(n, seq_len).copy())


# ---- scores -------------------------------------------------------------------------------------

@dataclass
class Importance:
    """Scores per axis, indexed like the model's weights (the current head order).

    ``layers[i]``: Mamba ``{"channels": [P], "heads": [H]}``, attention ``{"heads": [Hq]}``,
    MLP ``{"ffn": [F]}``, MoE ``{"experts": [E] (REAP), "expert_ffn": [E, F], "shared_ffn": [S]}``. ``depth`` [L] and ``depth_order`` (least important first) may be None.
    """
    hidden: torch.Tensor
    layers: list[dict[str, torch.Tensor]]
    depth: torch.Tensor | None = None
    depth_order: list[int] | None = None

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {"hidden": self.hidden}
        for i, d in enumerate(self.layers):
            out.update({f"layers.{i}.{k}": v for k, v in d.items()})
        if self.depth is not None:
            out["depth"] = self.depth
            out["depth_order"] = torch.tensor(self.depth_order, dtype=torch.long)
        return {k: v.detach().contiguous().cpu() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], num_layers: int) -> "Importance":
        layers: list[dict[str, torch.Tensor]] = [{} for _ in range(num_layers)]
        for k, v in t.items():
            if k.startswith("layers."):
                _, i, name = k.split(".")
                layers[int(i)][name] = v
        depth = t.get("depth")
        order = t["depth_order"].tolist() if "depth_order" in t else None
        return cls(t["hidden"], layers, depth, order)


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    """Scores accumulate in float32 whatever the weights' dtype (a bf16 sum of |x| loses the ranking)."""
    return None if t is None else t.float()


def _attention_head_norms(a, x: torch.Tensor) -> torch.Tensor:
    """Per query head, sum over batch and sequence of the L2 norm of its attention output [H]; float32."""
    H, nkv, hd = a.num_heads, a.num_kv_heads, a.head_dim
    q, k, v = (F.linear(x, _f32(proj.weight), _f32(proj.bias)) for proj in (a.q_proj, a.k_proj, a.v_proj))
    q = q.unflatten(-1, (H, hd)).transpose(1, 2)  # [b, H, l, hd]
    k = k.unflatten(-1, (nkv, hd)).transpose(1, 2)  # [b, nkv, l, hd]
    v = v.unflatten(-1, (nkv, hd)).transpose(1, 2)
    kv_of = torch.empty(H, dtype=torch.long, device=x.device)
    for g, members in enumerate(group_members(H, nkv, a.head_order)):
        kv_of[members] = g
    o = F.scaled_dot_product_attention(q, k[:, kv_of], v[:, kv_of], is_causal=True, scale=hd ** -0.5)
    return o.norm(dim=-1).sum(dim=(0, 2))  # [H]


def _moe_sums(m, x: torch.Tensor) -> list[torch.Tensor]:
    """One batch's sums for a MoE layer (float32 compute, float64 sums): [sum of g_j * ||f_j|| over the
    tokens routed to j [E], their count [E], expert neuron |up| sums [E, F], shared neuron |up| sums [S]]."""
    E, F_, din = m.experts.up_proj.shape
    v = moe_views(m, LayerWidths(experts=E, expert_ffn=F_, shared_ffn=m.shared_experts.up_proj.weight.shape[0]),
                  x.shape[-1])
    x = x.reshape(-1, x.shape[-1])  # [T, D]
    weights, idx = m.route(x, v)  # [T, k] float32, [T, k]
    u = x if v.latent is None else F.linear(x, _f32(v.latent[0]), _f32(v.latent[1]))  # [T, din]
    reap = torch.zeros(E, dtype=torch.float64)
    routed = torch.bincount(idx.reshape(-1), minlength=E).double().cpu()
    neurons = torch.zeros(E, F_, dtype=torch.float64)
    for j in range(E):  # one block of rows per expert, as moe.routed_experts runs them
        t, k = (idx == j).nonzero(as_tuple=True)
        if t.numel() == 0:
            continue
        a = F.linear(u[t], _f32(v.Wup[j]))  # [n, F]
        out = F.linear(m.act(a), _f32(v.Wdown[j]))  # [n, din]
        reap[j] = float((weights[t, k] * out.norm(dim=-1)).double().sum())
        neurons[j] = a.abs().sum(0).double().cpu()
    sh = m.shared_experts.up_proj
    shared = F.linear(x, _f32(sh.weight), _f32(sh.bias)).abs().sum(0).double().cpu()
    return [reap, routed, neurons, shared]


@torch.no_grad()
def width_scores(model, batches: list[torch.Tensor], head_channels: int | None = None,
                 progress: bool = False) -> Importance:
    """Embedding, FFN, Mamba channel/head and attention head scores from one pass (see module doc)."""
    cfg = model.config
    acc: dict = {"hidden": torch.zeros(cfg.hidden_size, dtype=torch.float64)}
    hooks = []

    def hook_for(i, blk):
        t = blk.block_type

        def hook(mixer, args):
            x = args[0].float()  # [b, l, D] = RMSNorm(h)
            acc["hidden"] += x.abs().sum(dim=(0, 1)).double().cpu()
            if t == "linear_attention":
                H, P = mixer.num_heads, mixer.head_dim
                W, b = mixer.in_proj.weight[H * P:2 * H * P], mixer.in_proj.bias
                s = F.linear(x, _f32(W), None if b is None else _f32(b[H * P:2 * H * P]))
                s = s.sum(dim=(0, 1)).view(H, P)  # signed sum over batch, sequence (Eq. 3)
                acc[i] = acc.get(i, 0) + s.double().cpu()
            elif t == "full_attention":
                acc[i] = acc.get(i, 0) + _attention_head_norms(mixer, x).double().cpu()
            elif t == "moe":
                acc[i] = [a + b for a, b in zip(acc[i], _moe_sums(mixer, x))] if i in acc else _moe_sums(mixer, x)
            else:
                u = F.linear(x, _f32(mixer.up_proj.weight), _f32(mixer.up_proj.bias))
                acc[i] = acc.get(i, 0) + u.abs().sum(dim=(0, 1)).double().cpu()

        return hook

    for i, blk in enumerate(model.backbone.layers):
        hooks.append(blk.mixer.register_forward_pre_hook(hook_for(i, blk)))
    try:
        with _progress(len(batches), "width scores", progress, unit="batch") as bar:
            for ids in batches:
                h = model.hidden_states(ids.to(model.device))  # final norm output
                acc["hidden"] += h.float().abs().sum(dim=(0, 1)).double().cpu()
                bar.update(1)
    finally:
        for hk in hooks:
            hk.remove()

    layers = []
    for i, blk in enumerate(model.backbone.layers):
        t = blk.block_type
        a = acc[i]
        if t == "linear_attention":
            ch = a.norm(dim=0)  # [P] (Eq. 3)
            k = a.shape[1] if head_channels is None else max(1, min(head_channels, a.shape[1]))
            top = torch.argsort(ch, descending=True, stable=True)[:k]
            layers.append({"channels": ch, "heads": a[:, top].norm(dim=1)})  # [H] (Eq. 4)
        elif t == "full_attention":
            layers.append({"heads": a})
        elif t == "moe":
            reap, routed, neurons, shared = a
            layers.append({"experts": reap / routed.clamp(min=1), "expert_ffn": neurons, "shared_ffn": shared})
        else:
            layers.append({"ffn": a})
    return Importance(acc["hidden"], layers)


def _skip_subnet(cfg, removed: set[int]) -> Subnet:
    full = full_subnet(cfg)
    return Subnet(full.hidden, tuple(LayerWidths(**{**w.to_dict(), "kept": i not in removed})
                                     for i, w in enumerate(full.layers)))


_LOGIT_CHUNK = 1 << 25  # logit elements compared at once (bounds the float64 difference's memory)


def _sq_err(model, h: torch.Tensor, full: torch.Tensor) -> float:
    """sum (M_full - M)^2 (float64 sum), M the logits of the residual stream h [b, l, d], position chunk by chunk."""
    b, l, _ = h.shape
    step = max(1, _LOGIT_CHUNK // max(1, b * full.shape[-1]))
    err = 0.0
    for s in range(0, l, step):
        m = model.lm_logits(model.final_norm(h[:, s:s + step]))  # [b, c, V] float32
        # float32 difference (relative error 2^-24 per element, so 1.2e-7 on the sum), float64 square and sum
        err += float((full[:, s:s + step] - m).double().pow(2).sum())
    return err


def _skip_errors(model, ids: torch.Tensor, removed: set[int], bar=None) -> tuple[dict[int, float], float]:
    """One batch's sum (M_full - M_-j)^2 for every layer j not in ``removed``, the layers in ``removed``
    skipped too, and sum M_full^2. The prefix runs once: h_j, the residual stream before layer j (the layers
    before it not in ``removed`` applied), is kept for every candidate j; M_-j runs only layers j+1.. from
    h_j (skipping j makes h_j the input of layer j+1). With nothing removed the prefix pass is the parent's
    forward and gives M_full too. Peak: one batch's L residual streams [b, l, d] and its logits [b, l, V]."""
    _, views = model.layer_views(None)
    L = len(views)
    live = [i for i in range(L) if i not in removed]
    h = F.embedding(ids, embedding_view(model.backbone.embeddings.weight, model.config.hidden_size))  # [b, l, d]
    before: dict[int, torch.Tensor] = {}
    for i in live:
        before[i] = h
        h = model.apply_layer(i, h, views[i])
    full = model(ids) if removed else model.lm_logits(model.final_norm(h))  # M_full [b, l, V] float32
    den = float(full.double().pow(2).sum())
    errs = {}
    for j in live:
        h = before.pop(j)  # h_j: dropped once used, so the kept streams shrink as j advances
        for i in live:
            if i > j:
                h = model.apply_layer(i, h, views[i])
        errs[j] = _sq_err(model, h, full)
        if bar is not None:
            bar.update(1)
    return errs, den


def _progress(total: int, desc: str, enabled: bool, unit: str = "layer"):
    """A tqdm bar (elapsed, rate and time left) on stderr; silent unless ``enabled``."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False, dynamic_ncols=True)


@torch.no_grad()
def depth_scores(model, batches: list[torch.Tensor], mode: str = "oneshot",
                 progress: bool = False) -> tuple[torch.Tensor, list[int]]:
    """Normalized logit MSE per layer (Eq. 5) and the depth order, least important first.

    Batch by batch: the parent's logits M_full of one batch and its prefix residual streams live at once
    (``_skip_errors``); the sums per layer accumulate across batches. ``progress``: a bar over the
    (batch, layer) scores with a time estimate."""
    if mode not in DEPTH_MODES[:2]:
        raise ConfigError(f"unknown depth mode {mode!r}", field="depth", fix=f"use one of {DEPTH_MODES}")
    L = model.config.num_hidden_layers
    dev = model.device
    den = 0.0

    def round_errors(removed: set[int], bar) -> dict[int, float]:
        nonlocal den
        num: dict[int, float] = {}
        for ids in batches:
            errs, batch_den = _skip_errors(model, ids.to(dev), removed, bar)
            if not removed:
                den += batch_den
            for j, e in errs.items():
                num[j] = num.get(j, 0.0) + e
        return num

    scores = torch.zeros(L, dtype=torch.float64)
    try:
        if mode == "oneshot":
            with _progress(L * len(batches), "depth (one-shot)", progress) as bar:
                num = round_errors(set(), bar)
            den = den or 1.0
            for j in range(L):
                scores[j] = num[j] / den
            order = torch.argsort(scores, stable=True).tolist()
        else:
            removed: list[int] = []
            with _progress(L * (L + 1) // 2 * len(batches), "depth (iterative)", progress) as bar:
                while len(removed) < L:
                    num = round_errors(set(removed), bar)
                    if not removed:
                        den = den or 1.0
                    rest = [j for j in range(L) if j not in removed]
                    # the last layer left scores against the empty model
                    j = min(rest, key=lambda r: (num[r] / den, r))
                    scores[j] = num[j] / den
                    removed.append(j)
            order = removed
    finally:
        model._views.clear()
    return scores, order


@torch.no_grad()
def compute_importance(model, calib: torch.Tensor, batch_size: int = 8, depth: str = "oneshot",
                       head_channels: int | None = None, progress: bool = False) -> Importance:
    """All scores for ``model`` (weights in their current order) from calibration windows [n, L]."""
    if depth not in DEPTH_MODES:
        raise ConfigError(f"unknown depth mode {depth!r}", field="depth", fix=f"use one of {DEPTH_MODES}")
    was_training = model.training
    model.eval()
    try:
        batches = list(calib.split(batch_size))
        imp = width_scores(model, batches, head_channels, progress)
        if depth != "none":
            imp.depth, imp.depth_order = depth_scores(model, batches, depth, progress)
    finally:
        model.train(was_training)
    return imp
