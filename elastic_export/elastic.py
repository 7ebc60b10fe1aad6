"""The elastic rule: which rows and columns of each weight a budget keeps. One place, used by the
elastic forward, the slicer and the exporters alike.

A budget (``Subnet``) is a global embedding width plus, per layer, whether it is kept and its
widths: Mamba heads and head channels, attention query heads, FFN neurons; for a MoE layer the
routed experts kept, each expert's FFN neurons and the shared expert's neurons. Weights are stored
importance-sorted, so every budget is a prefix on each axis; with ``head_order == "rank_major"``
"k heads per group" is a prefix of k*G heads (see ssd.group_heads). The views below are views of
the one weight copy: running a budget copies no weight.

MoE layers (:func:`moe_views`): a budget keeps a prefix of the routed experts (router rows and
``e_score_correction_bias`` with them), a prefix of every kept expert's neurons and a prefix of the
shared expert's. Its top-k is capped at what the kept experts can give (:func:`moe_top_k`). With
``n_group > 1`` routing groups the experts are stored in the head order of the config: rank-major
(position j*G + g holds the rank-j expert of group g, so "k experts per group" is a prefix of k*G)
in nested checkpoints, group-contiguous (expert e in group e // (E/G), as transformers) in HF ones.

Mamba head channels (m_d) make a budget an [h, p] sub-block of the [H, P] head grid; the x and z
projections are therefore given as 3-D views [h, p, d] and computed as a batched matmul over heads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .config import check_expert_groups
from .errors import BudgetError
from .ssd import group_heads


@dataclass(frozen=True)
class LayerWidths:
    """Widths of one layer in a budget. Fields that do not apply to the layer's type are None."""
    kept: bool = True
    mamba_heads: int | None = None
    mamba_head_dim: int | None = None
    attn_heads: int | None = None
    ffn: int | None = None
    experts: int | None = None  # MoE: routed experts kept (a prefix; the same count in every routing group)
    expert_ffn: int | None = None  # MoE: neurons of each kept routed expert (a prefix)
    shared_ffn: int | None = None  # MoE: neurons of the shared expert (a prefix)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Subnet:
    hidden: int
    layers: tuple[LayerWidths, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "layers": [w.to_dict() for w in self.layers]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Subnet":
        return cls(int(d["hidden"]), tuple(LayerWidths(**w) for w in d["layers"]))


def full_subnet(cfg) -> Subnet:
    """The parent itself as a subnet (every layer kept at its full width)."""
    layers = []
    for i, t in enumerate(cfg.layers_block_type):
        d = cfg.layer_dims(i)
        if t == "linear_attention":
            layers.append(LayerWidths(mamba_heads=d["mamba_num_heads"], mamba_head_dim=d["mamba_head_dim"]))
        elif t == "full_attention":
            layers.append(LayerWidths(attn_heads=d["num_attention_heads"]))
        elif t == "moe":
            layers.append(LayerWidths(experts=d["n_routed_experts"], expert_ffn=d["moe_intermediate_size"],
                                      shared_ffn=d["moe_shared_expert_intermediate_size"]))
        else:
            layers.append(LayerWidths(ffn=d["intermediate_size"]))
    return Subnet(cfg.hidden_size, tuple(layers))


def moe_top_k(cfg, experts: int) -> int:
    """Experts per token of a MoE layer keeping ``experts`` routed experts: the config's
    ``num_experts_per_tok``, capped at what the ``topk_group`` chosen groups of ``experts / n_group``
    can give. The one top-k rule: elastic forward, slicer, accounting and exporters use it."""
    return min(cfg.num_experts_per_tok, cfg.topk_group * (experts // cfg.n_group))


def validate_subnet(cfg, subnet: Subnet, where: str = "budget") -> None:
    """Refuse a subnet the parent cannot run: too wide, or breaking the group constraints."""
    def bad(msg, fix=None):
        raise BudgetError(msg, field=where, fix=fix)

    if len(subnet.layers) != cfg.num_hidden_layers:
        bad(f"has {len(subnet.layers)} layers, the parent has {cfg.num_hidden_layers}")
    if not 0 < subnet.hidden <= cfg.hidden_size:
        bad(f"embedding width {subnet.hidden} is outside 1..{cfg.hidden_size}")
    if not any(w.kept for w in subnet.layers):
        bad("keeps no layer", "keep at least one layer")
    for i, (t, w) in enumerate(zip(cfg.layers_block_type, subnet.layers)):
        full = cfg.layer_dims(i)
        if t == "linear_attention":
            h, p, H, G = w.mamba_heads, w.mamba_head_dim, full["mamba_num_heads"], cfg.n_groups
            if h is None or p is None or not (0 < h <= H and 0 < p <= full["mamba_head_dim"]):
                bad(f"layer {i}: Mamba widths {h} heads x {p} channels exceed the parent's "
                    f"{H} x {full['mamba_head_dim']}")
            if h % G:
                bad(f"layer {i}: {h} Mamba heads cannot be split evenly over {G} groups",
                    f"use a multiple of n_groups={G}")
            if h < H and G > 1 and cfg.head_order != "rank_major":
                bad(f"layer {i}: a Mamba head prefix needs rank-major head order",
                    "sort the parent first (elastic-export rank)")
        elif t == "full_attention":
            h, H, G = w.attn_heads, full["num_attention_heads"], cfg.num_key_value_heads
            if h is None or not 0 < h <= H:
                bad(f"layer {i}: {h} attention heads exceed the parent's {H}")
            if h % G:
                bad(f"layer {i}: {h} attention heads cannot be split evenly over {G} KV heads",
                    f"use a multiple of num_key_value_heads={G}")
            if h < H and G > 1 and cfg.head_order != "rank_major":
                bad(f"layer {i}: an attention head prefix needs rank-major head order",
                    "sort the parent first (elastic-export rank)")
        elif t == "moe":
            e, E, G = w.experts, full["n_routed_experts"], cfg.n_group
            if e is None or not 0 < e <= E:
                bad(f"layer {i}: {e} routed experts exceed the parent's {E}")
            for name, v, n in (("expert", w.expert_ffn, full["moe_intermediate_size"]),
                               ("shared-expert", w.shared_ffn, full["moe_shared_expert_intermediate_size"])):
                if v is None or not 0 < v <= n:
                    bad(f"layer {i}: {v} {name} neurons exceed the parent's {n}")
            check_expert_groups(e, G, lambda msg, fix: bad(f"layer {i}: {msg}", fix))
            if e < E and G > 1 and cfg.head_order != "rank_major":
                bad(f"layer {i}: an expert prefix over {G} routing groups needs rank-major expert order",
                    "sort the parent first (elastic-export rank)")
        else:
            if w.ffn is None or not 0 < w.ffn <= full["intermediate_size"]:
                bad(f"layer {i}: {w.ffn} FFN neurons exceed the parent's {full['intermediate_size']}")


# ---- views: the rule itself ---------------------------------------------------------------------

class MambaViews(NamedTuple):
    fused: torch.Tensor | None  # whole in_proj weight when the budget is the full layer (one GEMM)
    Wz: torch.Tensor  # [h, p, d]
    Wx: torch.Tensor  # [h, p, d]
    WB: torch.Tensor  # [G*N, d]
    WC: torch.Tensor  # [G*N, d]
    Wdt: torch.Tensor  # [h, d]
    bias: tuple | None  # (bz [h,p], bx [h,p], bB, bC, bdt [h]) when use_bias
    conv_x: torch.Tensor  # [h, p, K]
    conv_bc: torch.Tensor  # [2*G*N, K]
    conv_bias_x: torch.Tensor | None  # [h, p]
    conv_bias_bc: torch.Tensor | None  # [2*G*N]
    dt_bias: torch.Tensor  # [h]
    A_log: torch.Tensor  # [h]
    D: torch.Tensor  # [h]
    norm: torch.Tensor  # [h, p]
    Wout: torch.Tensor  # [d, h, p]
    bout: torch.Tensor | None  # [d]


def mamba_views(m, w: LayerWidths, d: int) -> MambaViews:
    """Views of a Mamba2 mixer's weights for h heads x p channels at embedding width d.

    in_proj rows are [z (H*P) | x (H*P) | B (G*N) | C (G*N) | dt (H)]; conv channels [x | B | C].
    """
    H, P, GN = m.num_heads, m.head_dim, m.n_groups * m.ssm_state_size
    I = H * P
    h, p = w.mamba_heads, w.mamba_head_dim
    W = m.in_proj.weight  # [2I + 2GN + H, D]
    D_full = W.shape[1]
    full = h == H and p == P and d == D_full
    conv = m.conv1d.weight[:, 0]  # [I + 2GN, K]
    b = m.in_proj.bias
    cb = m.conv1d.bias
    ob = m.out_proj.bias
    return MambaViews(
        fused=W if full else None,
        Wz=W[:I].view(H, P, D_full)[:h, :p, :d],
        Wx=W[I:2 * I].view(H, P, D_full)[:h, :p, :d],
        WB=W[2 * I:2 * I + GN, :d],
        WC=W[2 * I + GN:2 * I + 2 * GN, :d],
        Wdt=W[2 * I + 2 * GN:2 * I + 2 * GN + h, :d],
        bias=None if b is None else (b[:I].view(H, P)[:h, :p], b[I:2 * I].view(H, P)[:h, :p],
                                     b[2 * I:2 * I + GN], b[2 * I + GN:2 * I + 2 * GN],
                                     b[2 * I + 2 * GN:2 * I + 2 * GN + h]),
        conv_x=conv[:I].view(H, P, -1)[:h, :p],
        conv_bc=conv[I:],
        conv_bias_x=None if cb is None else cb[:I].view(H, P)[:h, :p],
        conv_bias_bc=None if cb is None else cb[I:],
        dt_bias=m.dt_bias[:h], A_log=m.A_log[:h], D=m.D[:h],
        norm=m.norm.weight.view(H, P)[:h, :p],
        Wout=m.out_proj.weight.view(-1, H, P)[:d, :h, :p],
        bout=None if ob is None else ob[:d],
    )


class AttentionViews(NamedTuple):
    Wq: torch.Tensor  # [h*hd, d]
    Wk: torch.Tensor  # [nkv*hd, d]
    Wv: torch.Tensor  # [nkv*hd, d]
    Wo: torch.Tensor  # [d, h*hd]  (no biases: NemotronH attention has none, see model.Attention)


def attention_views(a, w: LayerWidths, d: int) -> AttentionViews:
    rows = w.attn_heads * a.head_dim
    return AttentionViews(Wq=a.q_proj.weight[:rows, :d], Wk=a.k_proj.weight[:, :d], Wv=a.v_proj.weight[:, :d],
                          Wo=a.o_proj.weight[:d, :rows])


class MLPViews(NamedTuple):
    Wup: torch.Tensor  # [f, d]
    Wdown: torch.Tensor  # [d, f]
    biases: tuple | None


def mlp_views(m, w: LayerWidths, d: int) -> MLPViews:
    f = w.ffn
    bu = m.up_proj.bias
    return MLPViews(Wup=m.up_proj.weight[:f, :d], Wdown=m.down_proj.weight[:d, :f],
                    biases=None if bu is None else (bu[:f], m.down_proj.bias[:d]))


class MoEViews(NamedTuple):
    """A MoE layer's weights for a budget (e experts of f neurons, shared expert of s, width d).
    The routed experts read and write din = moe_latent_size (latent MoE) or d."""
    Wr: torch.Tensor  # [e, d] router weight (float32)
    score_bias: torch.Tensor  # [e] e_score_correction_bias (float32): for the choice of experts only
    top_k: int  # moe_top_k(cfg, e)
    Wup: torch.Tensor  # [e, f, din]
    Wdown: torch.Tensor  # [e, din, f]
    latent: tuple | None  # (W1 [L, d], b1 [L] or None, W2 [d, L], b2 [d] or None) for a latent MoE
    shared: MLPViews  # the shared expert: Wup [s, d], Wdown [d, s]


def moe_views(m, w: LayerWidths, d: int) -> MoEViews:
    """Views of a MoE mixer's weights (:class:`elastic_export.moe.MoE`) for a budget: the first
    ``w.experts`` routed experts (in stored order, see the module docstring), the first
    ``w.expert_ffn`` neurons of each, the first ``w.shared_ffn`` neurons of the shared expert."""
    e, f = w.experts, w.expert_ffn
    latent = None
    din = d
    if m.fc1_latent_proj is not None:
        f1, f2 = m.fc1_latent_proj, m.fc2_latent_proj
        latent = (f1.weight[:, :d], f1.bias, f2.weight[:d], None if f2.bias is None else f2.bias[:d])
        din = f1.weight.shape[0]  # the latent width is not an elastic axis
    return MoEViews(Wr=m.gate.weight[:e, :d], score_bias=m.gate.e_score_correction_bias[:e],
                    top_k=moe_top_k(m, e),  # the mixer carries the config's routing fields
                    Wup=m.experts.up_proj[:e, :f, :din], Wdown=m.experts.down_proj[:e, :din, :f],
                    latent=latent, shared=mlp_views(m.shared_experts, LayerWidths(ffn=w.shared_ffn), d))


def norm_view(norm, d: int) -> torch.Tensor:
    return norm.weight[:d]


def embedding_view(emb: torch.Tensor, d: int) -> torch.Tensor:
    """Embedding or lm_head weight [V, D] -> [V, d]."""
    return emb[:, :d]


# ---- head layouts -------------------------------------------------------------------------------

def group_members(heads: int, groups: int, head_order: str) -> list[list[int]]:
    """Head indices of each group: ``group_contiguous`` puts head h in group h // (heads/groups),
    ``rank_major`` in group h % groups (position j*G + g holds the rank-j head of group g)."""
    return group_heads(torch.arange(heads), groups, head_order, 0).tolist()


def head_order_index(heads: int, groups: int, src: str, dst: str) -> torch.Tensor:
    """Index ``idx`` such that ``t[idx]`` turns heads stored in order ``src`` into order ``dst``
    (the j-th head of group g keeps its group and its rank j)."""
    idx = torch.empty(heads, dtype=torch.long)
    for s, t in zip(group_members(heads, groups, src), group_members(heads, groups, dst)):
        idx[t] = torch.tensor(s)
    return idx
