"""The NemotronH hybrid Mamba2-Attention model, elastic by construction.

Module and parameter names match the HF `nemotron_h` checkpoint keys (``backbone.layers.{i}.mixer.*``)
so the state dict loads as is. Every forward takes an optional ``subnet`` (a budget): each module
computes with views of its weights given by the rule in :mod:`elastic_export.elastic`, so the full
model and every nested budget run the same code and no weight is copied.

Block: h = h + mixer(rmsnorm(h)); final norm_f; lm_head (the embeddings when tied: hf_io.resolve_tying).
Mixers, as transformers' NemotronH computes them:
- Mamba2: in_proj [z | x | B | C | dt], depthwise causal conv over xBC then ``mamba_hidden_act`` (SiLU),
  SSD scan with D skip, gated RMSNorm (y * silu(z), RMS over the channels of each group), out_proj.
- Attention: GQA, no positional encoding, no biases (``attention_bias`` is ignored, as transformers does).
- MLP: down(act(up(x))), act = ``mlp_hidden_act`` (relu^2); activations.py holds the table.
- MoE: routed experts plus a shared expert (:mod:`elastic_export.moe`), called as the MLP is.

``decode_step`` is the one-token step of generation (the torch engine's decode, dynamic and
static): each mixer's ``step`` (the MLP's forward) on states updated in place, checked against the
full forward (tests/test_decode_step.py). It shares with forward() the projections' views, the conv
activation, the dt discretization and the gated RMSNorm.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import activations, elastic
from .cache import InferenceCache, MambaWindow, StepState
from .config import ModelConfig
from .elastic import Subnet, full_subnet
from .moe import MoE
from .ssd import group_heads, ssd_scan, ssd_step_, ssd_update, ungroup_heads


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * xf).to(x.dtype)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()  # no op at all when already float32 (decode steps)


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, groups: int, head_order: str,
                   eps: float) -> torch.Tensor:
    """Mamba2's gated RMSNorm: y * silu(z), RMS over the channels of each group, times weight.
    y, z, weight [..., h, p] -> float32 [..., h, p]."""
    y = y * F.silu(_f32(z))
    dim, r = y.dim() - 2, y.shape[-2] // groups
    # the head axis as two axes without a copy: rank-major head j*G + g -> [r, G], else [G, r]
    yg, axes = (y.unflatten(dim, (r, groups)), (dim, -1)) if head_order == "rank_major" else \
        (y.unflatten(dim, (groups, r)), (dim + 1, -1))
    yg = yg * torch.rsqrt(yg.pow(2).mean(dim=axes, keepdim=True) + eps)
    return yg.flatten(dim, dim + 1) * _f32(weight)


def _linear3(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """x [..., d] times a per-head weight view W [h, p, d] -> [..., h, p], without copying W."""
    h, p, d = W.shape
    if W.stride(0) == p * W.stride(1):  # the [h, p] grid is one run of rows: a plain 2-D view
        return F.linear(x, W.view(h * p, d) if W.is_contiguous() else W.flatten(0, 1)).unflatten(-1, (h, p))
    return torch.einsum("...d,hpd->...hp", x, W)


def _out3(y: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """y [..., h, p] times W [d, h, p] -> [..., d]."""
    d, h, p = W.shape
    if W.stride(1) == p * W.stride(2):
        return F.linear(y.flatten(-2), W.flatten(1, 2))
    return torch.einsum("...hp,dhp->...d", y, W)


def _causal_conv(seq: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, l: int) -> torch.Tensor:
    """Depthwise causal conv. seq [b, K-1+l, *C] (past inputs first), weight [*C, K] -> [b, l, *C]."""
    K = weight.shape[-1]
    out = seq[:, 0:l] * weight[..., 0]
    for k in range(1, K):
        out = out + seq[:, k:k + l] * weight[..., k]
    if bias is not None:
        out = out + bias
    return out


def dt_limit(cfg: ModelConfig) -> tuple[float, float]:
    """The range dt = softplus(dt_proj + dt_bias) is clamped to, in prefill and decode alike.

    - A sequence (the chunked scan) follows transformers' NemotronH: [time_step_min, inf), its mixer's
      own ``time_step_limit = (config.time_step_min, inf)``; ``config.time_step_limit`` is ignored
      there, and so here.
    - One cached token (the decode step): transformers' ``mamba2_selective_state_update`` clamps not at
      all, so its decode departs from its own prefill where softplus(.) < time_step_min. We clamp as the
      scan does: decode equals prefill (what training computed, what validation checks). In the shipped
      model 6-15% of dt values of three Mamba layers fall below 1e-3, and an unclamped decode would
      differ from prefill by up to 0.045 in the logits; with random weights (dt well above 1e-3) the
      two references agree, as the parity tests show.
    The ONNX graphs and the engines take their clamp from here."""
    return cfg.time_step_min, math.inf


def clamp_dt(dt: torch.Tensor, limit: tuple[float, float]) -> torch.Tensor:
    """dt (>= 0, after softplus) clamped to ``limit``; no op where the limit cannot bind."""
    lo, hi = limit
    if lo <= 0.0 and hi == math.inf:
        return dt
    return dt.clamp(lo if lo > 0.0 else None, hi if hi != math.inf else None)


def forward_masks(input_ids: torch.Tensor, cache: InferenceCache | None, attention_mask: torch.Tensor | None):
    """(key mask [B, keys] or None, new tokens' mask [B, L] or None) of a forward over ``input_ids``:
    the cache's masks extended by ``attention_mask`` (recorded there), else the mask itself; None
    where nothing is padded."""
    b, l = input_ids.shape
    if cache is not None:
        key_mask = cache.extend_mask(attention_mask, b, l, input_ids.device)
    elif attention_mask is not None and not bool(attention_mask.all()):
        key_mask = attention_mask.to(device=input_ids.device, dtype=torch.bool)
    else:
        key_mask = None
    new_mask = None if key_mask is None else key_mask[:, -l:]
    if new_mask is not None and bool(new_mask.all()):
        new_mask = None
    return key_mask, new_mask


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps


class GatedRMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class MambaStep(NamedTuple):
    """Per-budget constants of a Mamba layer's decode step, which it would otherwise rebuild every call."""
    conv_w: torch.Tensor  # [C, K] the conv kernel of the kept channels [x | B | C] (~0.1% of the layer's bytes)
    conv_b: torch.Tensor | None  # [C]
    A: torch.Tensor  # [h] -exp(A_log), float32
    D: torch.Tensor  # [h, 1] float32
    norm: torch.Tensor  # [h, p] float32, the gated norm's weight
    Wout: torch.Tensor | None  # [d, h*p] a 2-D view of out_proj when the budget keeps whole heads
    Wzx: tuple | None  # ([h*p, d], [h*p, d]) 2-D views of the z and x rows, likewise


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: ModelConfig, dims: dict, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = dims["mamba_num_heads"], dims["mamba_head_dim"]
        self.n_groups, self.ssm_state_size = cfg.n_groups, cfg.ssm_state_size
        self.conv_kernel, self.chunk_size = cfg.conv_kernel, cfg.chunk_size
        self.eps, self.head_order = cfg.layer_norm_epsilon, cfg.head_order
        self.dt_limit = dt_limit(cfg)
        self.act = activations.get(cfg.mamba_hidden_act)  # after the conv over xBC
        I, GN = self.num_heads * self.head_dim, cfg.n_groups * cfg.ssm_state_size
        self.in_proj = nn.Linear(cfg.hidden_size, 2 * I + 2 * GN + self.num_heads, bias=cfg.use_bias)
        self.conv1d = nn.Module()
        self.conv1d.weight = nn.Parameter(torch.empty(I + 2 * GN, 1, cfg.conv_kernel))
        self.conv1d.bias = nn.Parameter(torch.zeros(I + 2 * GN)) if cfg.use_conv_bias else None
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        a = torch.empty(self.num_heads)  # (a meta arange would import torch._dynamo, see Backbone)
        self.A_log = nn.Parameter(a if a.is_meta else
                                  torch.log(torch.arange(1, self.num_heads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = GatedRMSNorm(I)
        self.out_proj = nn.Linear(I, cfg.hidden_size, bias=cfg.use_bias)

    def forward(self, hs: torch.Tensor, v: elastic.MambaViews, cache: InferenceCache | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        b, l, _ = hs.shape
        dtype = hs.dtype
        G, K = self.n_groups, self.conv_kernel
        h, p = v.Wz.shape[0], v.Wz.shape[1]
        if mask is not None:  # padded positions contribute nothing to the conv or SSM state
            hs = hs * mask[..., None].to(dtype)

        # 1. Input projection  # [z | x | B | C | dt]
        if v.fused is not None:
            zxbcdt = F.linear(hs, v.fused, self.in_proj.bias)
            z, x, B, C, dt = zxbcdt.split([h * p, h * p, v.WB.shape[0], v.WC.shape[0], h], dim=-1)
            z, x = z.unflatten(-1, (h, p)), x.unflatten(-1, (h, p))  # [b, l, h, p]
        else:
            z, x = _linear3(hs, v.Wz), _linear3(hs, v.Wx)
            B, C, dt = F.linear(hs, v.WB), F.linear(hs, v.WC), F.linear(hs, v.Wdt)
            if v.bias is not None:
                z, x, B, C, dt = (t + bb for t, bb in zip((z, x, B, C, dt), v.bias))
        BC = torch.cat([B, C], dim=-1)  # [b, l, 2GN]

        # 2. Depthwise causal conv over xBC (past inputs from the cache), then SiLU.
        if cache is not None and cache.conv[self.layer_idx] is not None:
            past = cache.conv[self.layer_idx].transpose(1, 2)  # [b, K-1, C]
        else:
            past = hs.new_zeros(b, K - 1, h * p + BC.shape[-1])
        x_seq = torch.cat([past[..., :h * p].unflatten(-1, (h, p)), x], dim=1)  # [b, K-1+l, h, p]
        bc_seq = torch.cat([past[..., h * p:], BC], dim=1)  # [b, K-1+l, 2GN]
        if cache is not None:
            tail = torch.cat([x_seq[:, -(K - 1):].flatten(2), bc_seq[:, -(K - 1):]], dim=-1)
            cache.conv[self.layer_idx] = tail.transpose(1, 2).contiguous()  # [b, C, K-1]
        x = self.conv_activation(_causal_conv(x_seq, v.conv_x, v.conv_bias_x, l))
        BC = self.conv_activation(_causal_conv(bc_seq, v.conv_bc, v.conv_bias_bc, l))
        if mask is not None:
            x, BC = x * mask[..., None, None].to(dtype), BC * mask[..., None].to(dtype)
        B, C = BC.unflatten(-1, (2 * G, -1)).chunk(2, dim=2)  # [b, l, G, N] each

        # 3. SSD scan (float32), D skip.
        A = -torch.exp(v.A_log.float())
        dt = self.discretize(dt, v)  # [b, l, h]
        state = cache.ssm[self.layer_idx] if cache is not None else None
        if cache is not None and cache.windows is not None:  # for cache.rewind (speculative decoding)
            cache.windows[self.layer_idx] = MambaWindow(x_seq, bc_seq, state, x, dt, A, B, self.head_order)
        if state is not None and l == 1:  # one cached token: the decode step
            y, state = ssd_update(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], self.head_order)
            y = y[:, None]
        else:
            # a few tokens after a cache (a speculative verification): one chunk of exactly l, no padding
            cs = l if state is not None and l < self.chunk_size else self.chunk_size
            y, state = ssd_scan(x, dt, A, B, C, cs, state, self.head_order)
        if cache is not None:
            cache.ssm[self.layer_idx] = state
        y = y + x.float() * v.D.float()[:, None]  # [b, l, h, p]

        # 4. Gated RMSNorm over the channels of each group, then out_proj.
        y = gated_rms_norm(y, z, v.norm, G, self.head_order, self.eps)
        out = _out3(y.to(dtype), v.Wout)
        return out if v.bout is None else out + v.bout

    # ---- pieces shared by forward() and the one-token step --------------------------------------
    def conv_activation(self, t: torch.Tensor) -> torch.Tensor:
        return self.act(t)  # config.mamba_hidden_act (SiLU by default)

    def discretize(self, dt: torch.Tensor, v: elastic.MambaViews) -> torch.Tensor:
        """dt projection [..., h] -> softplus(dt + dt_bias), clamped to ``dt_limit`` (see there), float32."""
        return clamp_dt(F.softplus(_f32(dt) + _f32(v.dt_bias)), self.dt_limit)

    def step_constants(self, v: elastic.MambaViews) -> MambaStep:
        h, p = v.Wz.shape[0], v.Wz.shape[1]
        K = v.conv_bc.shape[-1]
        conv_b = None if v.conv_bias_x is None else torch.cat([v.conv_bias_x.reshape(-1), v.conv_bias_bc])
        Wout = v.Wout.flatten(1, 2) if v.Wout.stride(1) == p * v.Wout.stride(2) else None
        Wzx = (v.Wz.flatten(0, 1), v.Wx.flatten(0, 1)) if v.Wz.stride(0) == p * v.Wz.stride(1) else None
        return MambaStep(torch.cat([v.conv_x.reshape(h * p, K), v.conv_bc]), conv_b, -torch.exp(v.A_log.float()),
                         v.D.float()[:, None], _f32(v.norm), Wout, Wzx)

    def step(self, hs: torch.Tensor, v: elastic.MambaViews, c: MambaStep, conv: torch.Tensor,
             ssm: torch.Tensor) -> torch.Tensor:
        """forward() of one token per sequence: hs [b, d] -> [b, d]. Updates in place the conv state
        conv [b, C, K-1] and the SSM state ssm [b, h, p, n] (float32). ``c``: step_constants(v)."""
        b = hs.shape[0]
        h, p, GN, G = v.Wz.shape[0], v.Wz.shape[1], v.WB.shape[0], self.n_groups
        # 1. Input projection  # [z | xBC | dt]; for the full layer x | B | C are adjacent rows (no cat)
        if v.fused is not None:
            z, xBC, dt = F.linear(hs, v.fused, self.in_proj.bias).split([h * p, h * p + 2 * GN, h], dim=-1)
        else:
            if c.Wzx is not None:
                z, x = F.linear(hs, c.Wzx[0]), F.linear(hs, c.Wzx[1])  # [b, h*p]
            else:
                z, x = _linear3(hs, v.Wz).flatten(1), _linear3(hs, v.Wx).flatten(1)
            B, C, dt = F.linear(hs, v.WB), F.linear(hs, v.WC), F.linear(hs, v.Wdt)
            if v.bias is not None:
                bz, bx, bB, bC, bdt = v.bias
                z, x, B, C, dt = z + bz.flatten(), x + bx.flatten(), B + bB, C + bC, dt + bdt
            xBC = torch.cat([x, B, C], dim=-1)  # [b, C]
        # 2. Depthwise causal conv over [past K-1 inputs | new] [b, C, K], then the activation.
        seq = torch.cat([conv, xBC[:, :, None]], dim=2)
        conv.copy_(seq[:, :, 1:])
        xBC = (seq * c.conv_w).sum(-1)
        if c.conv_b is not None:
            xBC = xBC + c.conv_b
        x, B, C = self.conv_activation(xBC).split([h * p, GN, GN], dim=-1)
        x = x.view(b, h, p)
        # 3. SSD step (float32, in place), D skip.
        y = ssd_step_(ssm, x, self.discretize(dt, v), c.A, B.view(b, G, -1), C.view(b, G, -1), self.head_order)
        y = torch.addcmul(y, _f32(x), c.D)  # [b, h, p]
        # 4. Gated RMSNorm, out_proj.
        y = gated_rms_norm(y, z.view(b, h, p), c.norm, G, self.head_order, self.eps)
        y = y if y.dtype == hs.dtype else y.to(hs.dtype)
        out = F.linear(y.view(b, h * p), c.Wout) if c.Wout is not None else _out3(y, v.Wout)
        return out if v.bout is None else out + v.bout


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, dims: dict, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = dims["num_attention_heads"], cfg.num_key_value_heads, \
            cfg.head_dim
        self.head_order = cfg.head_order
        D, hd = cfg.hidden_size, cfg.head_dim
        # no biases whatever attention_bias says: transformers' NemotronHAttention builds its four
        # projections with bias=False (it accepts the flag and ignores it), so its checkpoints hold none
        self.q_proj = nn.Linear(D, self.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(D, self.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(D, self.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, D, bias=False)

    def forward(self, hs: torch.Tensor, v: elastic.AttentionViews, cache: InferenceCache | None,
                key_mask: torch.Tensor | None) -> torch.Tensor:
        b, l, _ = hs.shape
        hd, nkv = self.head_dim, self.num_kv_heads
        q = F.linear(hs, v.Wq).unflatten(-1, (-1, hd))  # [b, l, h, hd]
        k = F.linear(hs, v.Wk).unflatten(-1, (nkv, hd)).transpose(1, 2)  # [b, nkv, l, hd]
        val = F.linear(hs, v.Wv).unflatten(-1, (nkv, hd)).transpose(1, 2)
        past = 0
        if cache is not None:
            past = cache.kv[self.layer_idx].length
            k, val = cache.kv[self.layer_idx].append(k, val)
        h = q.shape[2]
        # SDPA's GQA maps query head i to KV head i // (h/nkv): reorder rank-major heads to that.
        q = group_heads(q, nkv, self.head_order, 2).flatten(2, 3).transpose(1, 2)  # [b, h, l, hd]
        T = past + l
        if key_mask is None and past == 0:
            attn_mask, causal = None, l > 1
        elif key_mask is None and l == 1:
            attn_mask, causal = None, False
        else:
            qpos = torch.arange(past, T, device=hs.device)
            kpos = torch.arange(T, device=hs.device)
            attn_mask = (kpos[None, :] <= qpos[:, None])[None, None]  # [1, 1, l, T]
            if key_mask is not None:
                # a padded query sees only itself, so its softmax stays finite (its output is unused)
                attn_mask = attn_mask & key_mask[:, None, None, :] | (kpos[None, :] == qpos[:, None])
            causal = False
        o = F.scaled_dot_product_attention(q, k, val, attn_mask=attn_mask, is_causal=causal,
                                           scale=hd ** -0.5, enable_gqa=nkv != h)
        o = o.transpose(1, 2).unflatten(2, (nkv, h // nkv))  # [b, l, nkv, h/nkv, hd]
        o = ungroup_heads(o, self.head_order, 2)  # back to the stored head order of o_proj
        return F.linear(o.flatten(2), v.Wo)

    def step(self, hs: torch.Tensor, v: elastic.AttentionViews, K: torch.Tensor, V: torch.Tensor,
             pos: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """forward() of one token per sequence: hs [b, d] -> [b, d] over a preallocated KV cache K, V
        [b, nkv, T, hd]. Writes the new key and value at ``pos`` ([1] long tensor) and attends to the
        positions where ``key_mask`` [b, T] is True (None: all T)."""
        b = hs.shape[0]
        hd, nkv = self.head_dim, self.num_kv_heads
        K.index_copy_(2, pos, F.linear(hs, v.Wk).view(b, nkv, 1, hd))
        V.index_copy_(2, pos, F.linear(hs, v.Wv).view(b, nkv, 1, hd))
        q = F.linear(hs, v.Wq).view(b, -1, hd)  # [b, h, hd]
        h = q.shape[1]
        q = group_heads(q, nkv, self.head_order, 1).reshape(b, h, 1, hd)  # SDPA's GQA order, as forward()
        mask = None if key_mask is None else key_mask[:, None, None, :]
        o = F.scaled_dot_product_attention(q, K, V, attn_mask=mask, scale=hd ** -0.5, enable_gqa=nkv != h)
        o = ungroup_heads(o.view(b, nkv, h // nkv, hd), self.head_order, 1)  # the stored head order
        return F.linear(o.reshape(b, h * hd), v.Wo)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dims: dict, layer_idx: int):
        super().__init__()
        self.up_proj = nn.Linear(cfg.hidden_size, dims["intermediate_size"], bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(dims["intermediate_size"], cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = activations.get(cfg.mlp_hidden_act)

    def forward(self, hs: torch.Tensor, v: elastic.MLPViews) -> torch.Tensor:
        bu, bd = v.biases if v.biases is not None else (None, None)
        return F.linear(self.act(F.linear(hs, v.Wup, bu)), v.Wdown, bd)


class StepPlan(NamedTuple):
    """A budget's weights for decode_step: views of the one weight copy, plus each Mamba layer's
    step constants."""
    emb: torch.Tensor  # [V, d]
    head: torch.Tensor  # [V, d]
    norm_f: torch.Tensor  # [d]
    layers: tuple  # per layer: None (skipped) or (block, norm [d], views, MambaStep or None)


MIXERS = {"linear_attention": Mamba2Mixer, "full_attention": Attention, "mlp": MLP, "moe": MoE}
VIEWS = {"linear_attention": elastic.mamba_views, "full_attention": elastic.attention_views,
         "mlp": elastic.mlp_views, "moe": elastic.moe_views}


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.block_type = cfg.layers_block_type[layer_idx]
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.mixer = MIXERS[self.block_type](cfg, cfg.layer_dims(layer_idx), layer_idx)

    def residual(self, h: torch.Tensor, v, cache: InferenceCache | None = None, new_mask: torch.Tensor | None = None,
                 key_mask: torch.Tensor | None = None, gate: torch.Tensor | None = None) -> torch.Tensor:
        """Residual stream [B, L, d] after this layer with its views ``v``: h + gate * mixer(rmsnorm(h))."""
        x = rms_norm(h, elastic.norm_view(self.norm, h.shape[-1]), self.norm.eps)
        if self.block_type == "linear_attention":
            x = self.mixer(x, v, cache, new_mask)
        elif self.block_type == "full_attention":
            x = self.mixer(x, v, cache, key_mask)
        else:  # MLP or MoE: position-wise
            x = self.mixer(x, v)
        if gate is not None:
            x = x * gate.to(x.dtype)
        return h + x

    def forward(self, h: torch.Tensor, widths: elastic.LayerWidths, cache: InferenceCache | None = None,
                new_mask: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                gate: torch.Tensor | None = None) -> torch.Tensor:
        """The layer at ``widths``, its views taken inside this call: the call FSDP2 wraps (the layer's
        parameters are whole only during it) and activation checkpointing recomputes."""
        return self.residual(h, VIEWS[self.block_type](self.mixer, widths, h.shape[-1]), cache, new_mask, key_mask,
                             gate)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        shape = (cfg.vocab_size, cfg.hidden_size)
        empty = torch.empty(shape)
        # on the meta device (every load) skip nn.Embedding's normal_ init: a meta normal_ goes through
        # torch._refs, which imports torch._dynamo (~150 MB and ~1-3 s in every command); elsewhere init as usual
        self.embeddings = nn.Embedding(*shape, _weight=empty) if empty.is_meta else nn.Embedding(*shape)
        self.layers = nn.ModuleList([Block(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)


class NemotronHForCausalLM(nn.Module):
    """``model(input_ids)`` -> float32 logits [B, L, V]. ``subnet`` selects a nested budget."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.backbone = Backbone(cfg)
        # tied: the embeddings project the logits. A loaded config ties only when its weights hold no
        # lm_head.weight (hf_io.resolve_tying), so this follows the checkpoint, not config.json alone.
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._views: dict[Subnet, list] = {}
        # How hidden_states() runs the layers (set by the trainer): ``layerwise`` calls each Block with its
        # widths, so each layer takes its views inside its own call (FSDP2 unshards a layer only then), instead
        # of taking every layer's views up front; ``checkpoint_layers`` also recomputes each layer's
        # activations in the backward (torch.utils.checkpoint, non-reentrant) instead of keeping them.
        self.layerwise = False
        self.checkpoint_layers = False

    # ---- weights -------------------------------------------------------------------------------
    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.backbone.embeddings.weight if self.lm_head is None else self.lm_head.weight

    def _apply(self, fn, *args, **kwargs):
        self._views.clear()
        return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        self._views.clear()
        return super().load_state_dict(*args, **kwargs)

    def layer_views(self, subnet: Subnet | None) -> tuple[Subnet, list]:
        """Per-layer weight views of a budget (cached while gradients are off)."""
        subnet = subnet or full_subnet(self.config)
        if not torch.is_grad_enabled() and subnet in self._views:
            return subnet, self._views[subnet]
        d = subnet.hidden
        views = [VIEWS[blk.block_type](blk.mixer, w, d) if w.kept else None
                 for blk, w in zip(self.backbone.layers, subnet.layers)]
        if not torch.is_grad_enabled():
            self._views[subnet] = views
        return subnet, views

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.backbone.embeddings.weight.device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- what a layer computes with: the views themselves here; a quantized model
    # (elastic_export.qmodel) dequantizes them here, one layer at a time ---------------------------
    def layer_weights(self, blk, v, c=None):
        """(views, Mamba step constants) layer ``blk`` computes with, from its views ``v`` and ``c``."""
        return v, c

    def embed(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, weight)  # weight: the embedding view [V, d]

    def project(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(h, weight)  # weight: the lm_head view [V, d]

    # ---- forward -------------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, subnet: Subnet | None = None,
                      cache: InferenceCache | None = None, attention_mask: torch.Tensor | None = None,
                      skip_layer: int | None = None, gates: tuple | None = None) -> torch.Tensor:
        """Final normed hidden states [B, L, d]. ``skip_layer`` drops one layer (depth importance).

        ``gates = (embedding_gate, [layer_gate or None per layer])``: optional scalar tensors that
        multiply the embedding output and each kept layer's mixer output. The router's hard mask
        passes straight-through values (exactly 1 in the forward, gradient to the router), so the
        result equals the plain budget forward.
        """
        layerwise = self.layerwise or self.checkpoint_layers
        subnet, views = (subnet or full_subnet(self.config), None) if layerwise else self.layer_views(subnet)
        d = subnet.hidden
        l = input_ids.shape[1]
        key_mask, new_mask = forward_masks(input_ids, cache, attention_mask)
        h = self.embed(input_ids, elastic.embedding_view(self.backbone.embeddings.weight, d))
        embedding_gate, layer_gates = gates if gates is not None else (None, None)
        if embedding_gate is not None:
            h = h * embedding_gate.to(h.dtype)
        recompute = self.checkpoint_layers and torch.is_grad_enabled()
        for i, w in enumerate(subnet.layers):
            if not w.kept or i == skip_layer:
                continue  # a skipped layer is the identity on the residual stream
            gate = None if layer_gates is None else layer_gates[i]
            if views is not None:
                h = self.apply_layer(i, h, views[i], cache, new_mask, key_mask, gate)
            elif recompute:
                h = checkpoint(self.backbone.layers[i], h, w, cache, new_mask, key_mask, gate, use_reentrant=False)
            else:
                h = self.backbone.layers[i](h, w, cache, new_mask, key_mask, gate)
        if cache is not None:
            cache.advance(l)
        return self.final_norm(h)

    def apply_layer(self, i: int, h: torch.Tensor, v, cache: InferenceCache | None = None,
                    new_mask: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                    gate: torch.Tensor | None = None) -> torch.Tensor:
        """Residual stream [B, L, d] after layer ``i`` (its views ``v``): h + gate * mixer(rmsnorm(h))."""
        blk = self.backbone.layers[i]
        v, _ = self.layer_weights(blk, v)  # a quantized model dequantizes the layer's views here
        return blk.residual(h, v, cache, new_mask, key_mask, gate)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        """norm_f of the residual stream [B, L, d]."""
        return rms_norm(h, elastic.norm_view(self.backbone.norm_f, h.shape[-1]), self.config.layer_norm_epsilon)

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """float32 logits [B, L, V] of final normed hidden states [B, L, d]."""
        return self.project(h, elastic.embedding_view(self.lm_head_weight, h.shape[-1])).float()

    def forward(self, input_ids: torch.Tensor, subnet: Subnet | None = None, cache: InferenceCache | None = None,
                attention_mask: torch.Tensor | None = None, last_only: bool = False,
                skip_layer: int | None = None, gates: tuple | None = None) -> torch.Tensor:
        h = self.hidden_states(input_ids, subnet, cache, attention_mask, skip_layer, gates)
        if last_only:
            h = h[:, -1:]
        return self.lm_logits(h)

    def new_cache(self) -> InferenceCache:
        return InferenceCache(self.config.num_hidden_layers)

    # ---- the one-token decode step -------------------------------------------------------------
    @torch.no_grad()
    def step_plan(self, subnet: Subnet | None = None) -> StepPlan:
        subnet, views = self.layer_views(subnet)
        d = subnet.hidden
        layers = []
        for blk, v in zip(self.backbone.layers, views):
            c = blk.mixer.step_constants(v) if v is not None and blk.block_type == "linear_attention" else None
            layers.append(None if v is None else (blk, elastic.norm_view(blk.norm, d), v, c))
        return StepPlan(elastic.embedding_view(self.backbone.embeddings.weight, d),
                        elastic.embedding_view(self.lm_head_weight, d), elastic.norm_view(self.backbone.norm_f, d),
                        tuple(layers))

    def decode_step(self, tokens: torch.Tensor, plan: StepPlan, state: StepState,
                    length: int | None = None) -> torch.Tensor:
        """One token per sequence (tokens [b]) through a budget -> float32 logits [b, V]; ``state``
        (cache.StepState) is updated in place and ``state.pos`` advanced. The torch engine's decode,
        dynamic and static alike; forward() of a one-token input with a cache is its reference.

        ``length`` (tokens in the KV cache before this one): attention reads length + 1 positions.
        None: it reads the whole preallocated cache, masked to the positions up to ``state.pos``, so
        that every shape is fixed (torch.compile, CUDA graphs).
        """
        eps = self.config.layer_norm_epsilon
        if length is None:
            T = state.key_valid.shape[1]
            key_mask = (torch.arange(T, device=tokens.device) <= state.pos) & state.key_valid  # [b, T]
        else:
            key_mask = None if state.key_valid is None else state.key_valid[:, :length + 1]
        h = self.embed(tokens, plan.emb)  # [b, d]
        for i, layer in enumerate(plan.layers):
            if layer is None:
                continue  # a skipped layer is the identity
            blk, norm, v, c = layer
            v, c = self.layer_weights(blk, v, c)
            # rms_norm as one fused op (float32 inside, the same values; rms_norm spells it out for ONNX)
            x = F.rms_norm(h, norm.shape, norm, eps)
            if blk.block_type == "linear_attention":
                x = blk.mixer.step(x, v, c, state.conv[i], state.ssm[i])
            elif blk.block_type == "full_attention":
                K, V = state.k[i], state.v[i]
                if length is not None:
                    K, V = K[:, :, :length + 1], V[:, :, :length + 1]
                x = blk.mixer.step(x, v, K, V, state.pos, key_mask)
            else:  # MLP or MoE: position-wise, the forward itself
                x = blk.mixer(x, v)
            h = h + x
        state.pos.add_(1)
        return self.project(F.rms_norm(h, plan.norm_f.shape, plan.norm_f, eps), plan.head).float()

    # ---- conveniences --------------------------------------------------------------------------
    def save_pretrained(self, path, dtype: torch.dtype | None = None, max_shard_bytes: int | None = None) -> None:
        from .hf_io import save_pretrained
        save_pretrained(self, path, dtype=dtype, max_shard_bytes=max_shard_bytes)

    def generate(self, input_ids, max_new_tokens: int, **kwargs):
        from .generate import generate
        return generate(self, input_ids, max_new_tokens, **kwargs)


@torch.no_grad()
def init_weights(model: NemotronHForCausalLM, seed: int | None = None) -> NemotronHForCausalLM:
    """Initialize like the reference implementation (normal(0.02), S4D-real A, log-uniform dt)."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    std = cfg.initializer_range
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            continue
        if name.endswith("out_proj.weight") and cfg.rescale_prenorm_residual:
            bound = 1 / math.sqrt(p.shape[1])
            p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound / math.sqrt(cfg.num_hidden_layers))
        elif name.endswith(("proj.weight", "embeddings.weight", "lm_head.weight", "experts.up_proj",
                            "experts.down_proj", "gate.weight")):
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        elif name.endswith("conv1d.weight"):
            bound = 1 / math.sqrt(p.shape[-1])
            p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
        elif name.endswith("bias") and not name.endswith("dt_bias"):
            p.zero_()
    for blk in model.backbone.layers:
        if blk.block_type == "linear_attention":
            m = blk.mixer
            m.A_log.copy_(torch.log(torch.arange(1, m.num_heads + 1, dtype=torch.float32)))
            m.D.fill_(1.0)
            lo, hi = math.log(cfg.time_step_min), math.log(cfg.time_step_max)
            dt = torch.exp(torch.rand(m.num_heads, generator=gen) * (hi - lo) + lo).clamp(min=cfg.time_step_floor)
            m.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
    return model


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                seed: int | None = 0) -> NemotronHForCausalLM:
    """A freshly initialized model (``device="meta"`` builds the structure without memory)."""
    with torch.device(device):
        model = NemotronHForCausalLM(cfg)
    if str(device) != "meta":
        init_weights(model, seed)
    return model.to(dtype)
