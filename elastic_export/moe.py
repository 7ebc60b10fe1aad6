"""The MoE mixer of Nemotron 3 (layer type ``moe``), as transformers' ``NemotronHMoE`` computes it.

    out = fc2(sum_k w_k * expert_{i_k}(fc1(x))) + shared(x)      expert(u) = down(act(up(u))), no gate

- router (``gate``): logits = x W^T in float32 (weight and ``e_score_correction_bias`` stay float32 at
  every precision), scores = sigmoid(logits). The experts are chosen on scores + bias (the bias only
  steers the choice): with ``n_group`` routing groups, the ``topk_group`` groups whose two best
  scores sum highest, then the top-k experts inside them. Their weights are the plain scores,
  divided by their sum (+1e-20) when ``norm_topk_prob``, times ``routed_scaling_factor``.
- routed experts: ``experts.up_proj`` [E, F, din], ``experts.down_proj`` [E, din, F] (transformers'
  stacked layout; checkpoints may hold one ``experts.{j}.up_proj.weight`` per expert, see hf_io),
  activation ``mlp_hidden_act``. din = ``moe_latent_size`` for a latent MoE (``fc1_latent_proj``
  [L, D] before the experts, ``fc2_latent_proj`` [D, L] after), else hidden_size.
- shared expert: an MLP of ``moe_shared_expert_intermediate_size`` neurons on x, always on.

CPU-friendly: the (token, expert) assignments are sorted by expert, each expert runs once on its
rows (a loop over experts, never over tokens), the weighted rows are summed back per token in
float32 (index_add_), as transformers accumulates them. The same code runs a prefill, a cached
forward and the one-token decode step (x of any leading shape). Every budget is a set of views of
the one weight copy (:func:`elastic_export.elastic.moe_views`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import activations, elastic
from .config import ModelConfig
from .ssd import group_heads, ungroup_heads


class TopkRouter(nn.Module):
    """The router's weight and score-correction bias, kept in float32 whatever the model's dtype."""

    def __init__(self, num_experts: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        def keep_float32(t):
            out = fn(t)
            if t.is_floating_point() and out.is_floating_point() and out.dtype != torch.float32:
                return t.to(device=out.device, dtype=torch.float32)  # the move, not the cast
            return out

        return super()._apply(keep_float32, recurse)


class Experts(nn.Module):
    def __init__(self, num_experts: int, ffn: int, din: int):
        super().__init__()
        self.up_proj = nn.Parameter(torch.empty(num_experts, ffn, din))  # [E, F, din]
        self.down_proj = nn.Parameter(torch.empty(num_experts, din, ffn))  # [E, din, F]


class SharedExpert(nn.Module):
    def __init__(self, hidden: int, ffn: int, bias: bool):
        super().__init__()
        self.up_proj = nn.Linear(hidden, ffn, bias=bias)
        self.down_proj = nn.Linear(ffn, hidden, bias=bias)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, dims: dict, layer_idx: int):
        super().__init__()
        D, E = cfg.hidden_size, dims["n_routed_experts"]
        self.layer_idx = layer_idx
        # the routing fields, under the config's names (elastic.moe_top_k reads them from here)
        self.num_experts_per_tok, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.head_order = cfg.head_order  # the experts' order over the routing groups
        self.act = activations.get(cfg.mlp_hidden_act)
        self.gate = TopkRouter(E, D)
        self.experts = Experts(E, dims["moe_intermediate_size"], cfg.moe_input_size)
        self.shared_experts = SharedExpert(D, dims["moe_shared_expert_intermediate_size"], cfg.mlp_bias)
        self.fc1_latent_proj = self.fc2_latent_proj = None
        if cfg.moe_latent_size is not None:
            self.fc1_latent_proj = nn.Linear(D, cfg.moe_latent_size, bias=cfg.mlp_bias)
            self.fc2_latent_proj = nn.Linear(cfg.moe_latent_size, D, bias=cfg.mlp_bias)

    def forward(self, hs: torch.Tensor, v: elastic.MoEViews) -> torch.Tensor:
        """hs [..., d] -> [..., d]."""
        x = hs.reshape(-1, hs.shape[-1])  # [T, d]
        weights, idx = self.route(x, v)  # [T, k] float32, [T, k]
        u = x if v.latent is None else F.linear(x, v.latent[0], v.latent[1])  # [T, din]
        y = routed_experts(u, idx, weights, v.Wup, v.Wdown, self.act)
        if v.latent is not None:
            y = F.linear(y, v.latent[2], v.latent[3])
        sh = v.shared
        bu, bd = sh.biases if sh.biases is not None else (None, None)
        y = y + F.linear(self.act(F.linear(x, sh.Wup, bu)), sh.Wdown, bd)
        return y.view(hs.shape)

    def route(self, x: torch.Tensor, v: elastic.MoEViews) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, d] -> (weights [T, k] float32, expert indices [T, k]), as NemotronHTopkRouter."""
        scores = F.linear(x.float(), v.Wr.float()).sigmoid()  # [T, e]
        choice = scores + v.score_bias
        G = self.n_group
        if G > 1 and self.topk_group < G:  # else every group is chosen: no mask
            grouped = group_heads(choice, G, self.head_order, 1)  # [T, G, e/G]
            group_scores = grouped.topk(2, dim=-1)[0].sum(-1)  # [T, G]
            chosen = group_scores.topk(self.topk_group, dim=-1, sorted=False)[1]
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)
            keep = ungroup_heads(keep[..., None].expand(grouped.shape), self.head_order, 1)  # [T, e]
            choice = choice.masked_fill(~keep, float("-inf"))
        idx = choice.topk(v.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, idx)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, idx


def routed_experts(u: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, Wup: torch.Tensor,
                   Wdown: torch.Tensor, act) -> torch.Tensor:
    """sum_k weights[t, k] * down_j(act(up_j(u[t]))), j = idx[t, k]: u [T, din] -> [T, din] (u's dtype).

    The T*k assignments are sorted by expert (stable), so each expert multiplies one contiguous block
    of rows; Wup [e, f, din] / Wdown [e, din, f] may be strided views of the full weights."""
    T, k = idx.shape
    flat = idx.reshape(-1)  # [T*k], assignment a = t*k + slot
    order = torch.argsort(flat, stable=True)  # assignments grouped by expert
    rows = order // k  # the token of each sorted assignment
    counts = torch.bincount(flat, minlength=Wup.shape[0]).tolist()
    xs = u.index_select(0, rows)  # [T*k, din]
    ys = torch.empty_like(xs)
    start = 0
    for j, n in enumerate(counts):
        if n:
            ys[start:start + n] = F.linear(act(F.linear(xs[start:start + n], Wup[j])), Wdown[j])
            start += n
    ys = ys * weights.reshape(-1)[order, None]  # float32, as transformers weighs and sums
    out = torch.zeros(T, u.shape[-1], dtype=ys.dtype, device=u.device).index_add_(0, rows, ys)
    return out.to(u.dtype)
