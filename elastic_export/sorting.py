"""Sort a parent's weights by importance so that every budget is a prefix (function preserving).

Permutations (``perm[new] = old``, most important first):
- embedding channels: one permutation of D applied to the embeddings, lm_head, every norm, every
  input projection's columns and every output projection's rows (RMSNorm over all D channels does
  not care about their order);
- FFN neurons: up_proj rows, down_proj columns;
- Mamba: one channel permutation of P shared by all heads (a budget keeps the first p channels of
  every head) and a head permutation; heads are ranked inside their group and stored rank-major
  (position j*G + g holds the rank-j head of group g), so a head never changes group and every
  group keeps the same count. z, x, dt rows, the conv's x channels, dt_bias, A_log, D, the gated
  norm and out_proj's columns move together; B, C and n_groups are untouched;
- attention: query heads ranked inside their KV group and stored rank-major (q rows, o columns);
- MoE: routed experts by REAP score, ranked inside their routing group (``n_group``) and stored
  rank-major like Mamba heads (elastic.moe_views: k experts per group are a prefix of k*G); the
  router's rows, ``e_score_correction_bias`` and the expert weights move together (the grouped
  top-k reads groups in the same head order, so every token picks the same experts); each expert's
  neurons by its own scores (up rows, down columns of that expert), the shared expert's as an MLP's.
  The latent projections (latent MoE) take the embedding permutation only.
The sorted model has ``head_order = "rank_major"``; its logits equal the parent's up to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .elastic import group_members
from .importance import Importance


@dataclass
class Permutations:
    hidden: torch.Tensor  # [D]
    # Mamba {"heads", "channels"}, attention {"heads"}, MLP {"ffn"},
    # MoE {"experts" [E], "expert_ffn" [E, F] (row j: expert j's neuron order, old indices), "shared_ffn"}
    layers: list[dict[str, torch.Tensor]]


def _desc(scores: torch.Tensor) -> torch.Tensor:
    return torch.argsort(scores, descending=True, stable=True)


def rank_major_perm(scores: torch.Tensor, groups: int, head_order: str) -> torch.Tensor:
    """Heads ranked inside each group, stored rank-major: perm[j*G + g] = rank-j head of group g."""
    H = scores.numel()
    perm = torch.empty(H, dtype=torch.long)
    for g, members in enumerate(group_members(H, groups, head_order)):
        members = torch.tensor(members)
        ranked = members[_desc(scores[members])]
        perm[torch.arange(len(members)) * groups + g] = ranked
    return perm


def permutations(cfg, imp: Importance) -> Permutations:
    layers = []
    for t, s in zip(cfg.layers_block_type, imp.layers):
        if t == "linear_attention":
            layers.append({"heads": rank_major_perm(s["heads"], cfg.n_groups, cfg.head_order),
                           "channels": _desc(s["channels"])})
        elif t == "full_attention":
            layers.append({"heads": rank_major_perm(s["heads"], cfg.num_key_value_heads, cfg.head_order)})
        elif t == "moe":
            layers.append({"experts": rank_major_perm(s["experts"], cfg.n_group, cfg.head_order),
                           "expert_ffn": torch.argsort(s["expert_ffn"], dim=1, descending=True, stable=True),
                           "shared_ffn": _desc(s["shared_ffn"])})
        else:
            layers.append({"ffn": _desc(s["ffn"])})
    return Permutations(_desc(imp.hidden), layers)


def _grid(heads: torch.Tensor, channels: torch.Tensor, P: int) -> torch.Tensor:
    """Flat index over [H, P] rows: new (h, p) <- old (heads[h], channels[p])."""
    return (heads[:, None] * P + channels[None, :]).reshape(-1)


def permutation_ops(cfg, perms: Permutations) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """What the permutations do to each tensor (names as in the HF checkpoint, experts stacked):
    name -> [(dim, index), ...], applied in turn by :func:`permute_tensor`. A 1-D index reorders
    ``dim``; a 2-D one [E, F] reorders ``dim`` of each stacked expert e by its own row (a gather)."""
    ops: dict[str, list] = {}
    pi = perms.hidden

    def cols(name, idx):
        ops.setdefault(name, []).append((1, idx))

    def rows(name, idx):
        ops.setdefault(name, []).append((0, idx))

    cols("backbone.embeddings.weight", pi)
    cols("lm_head.weight", pi)
    rows("backbone.norm_f.weight", pi)
    for i, (t, p) in enumerate(zip(cfg.layers_block_type, perms.layers)):
        pre = f"backbone.layers.{i}."
        m = pre + "mixer."
        rows(pre + "norm.weight", pi)
        if t == "linear_attention":
            dims = cfg.layer_dims(i)
            H, P = dims["mamba_num_heads"], dims["mamba_head_dim"]
            I, GN = H * P, cfg.n_groups * cfg.ssm_state_size
            hp = _grid(p["heads"], p["channels"], P)
            # in_proj rows  # [z (I) | x (I) | B (GN) | C (GN) | dt (H)]
            idx = torch.cat([hp, I + hp, 2 * I + torch.arange(2 * GN), 2 * I + 2 * GN + p["heads"]])
            rows(m + "in_proj.weight", idx)
            rows(m + "in_proj.bias", idx)
            cols(m + "in_proj.weight", pi)
            conv = torch.cat([hp, I + torch.arange(2 * GN)])  # conv channels  # [x (I) | B | C]
            rows(m + "conv1d.weight", conv)
            rows(m + "conv1d.bias", conv)
            for name in ("dt_bias", "A_log", "D"):
                rows(m + name, p["heads"])
            rows(m + "norm.weight", hp)
            cols(m + "out_proj.weight", hp)
            rows(m + "out_proj.weight", pi)
            rows(m + "out_proj.bias", pi)
        elif t == "full_attention":
            hd = cfg.head_dim
            q = (p["heads"][:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)
            rows(m + "q_proj.weight", q)  # (attention has no biases: model.Attention)
            for name in ("q_proj", "k_proj", "v_proj"):
                cols(m + name + ".weight", pi)
            cols(m + "o_proj.weight", q)
            rows(m + "o_proj.weight", pi)
        elif t == "moe":
            pe = p["experts"]
            for name in ("gate.weight", "gate.e_score_correction_bias", "experts.up_proj", "experts.down_proj"):
                rows(m + name, pe)
            cols(m + "gate.weight", pi)
            nf = p["expert_ffn"][pe]  # [E, F]: neuron order of each expert at its new position
            ops[m + "experts.up_proj"].append((1, nf))  # [E, F, din]
            ops[m + "experts.down_proj"].append((2, nf))  # [E, din, F]
            if cfg.moe_latent_size is not None:  # latent: D -> L -> D; the experts see L, not D
                cols(m + "fc1_latent_proj.weight", pi)
                rows(m + "fc2_latent_proj.weight", pi)
                rows(m + "fc2_latent_proj.bias", pi)
            else:
                ops[m + "experts.up_proj"].append((2, pi))
                ops[m + "experts.down_proj"].append((1, pi))
            _mlp_ops(ops, m + "shared_experts.", p["shared_ffn"], pi)
        else:
            _mlp_ops(ops, m, p["ffn"], pi)
    return ops


def _mlp_ops(ops: dict, m: str, f: torch.Tensor, pi: torch.Tensor) -> None:
    """An MLP's neurons by ``f`` (up rows, down columns) and its embedding side by ``pi``."""
    for name, dim, idx in ((m + "up_proj.weight", 0, f), (m + "up_proj.bias", 0, f), (m + "up_proj.weight", 1, pi),
                           (m + "down_proj.weight", 1, f), (m + "down_proj.weight", 0, pi),
                           (m + "down_proj.bias", 0, pi)):
        ops.setdefault(name, []).append((dim, idx))


def permute_tensor(t: torch.Tensor, ops) -> torch.Tensor:
    """``t`` with :func:`permutation_ops`' reorderings applied (a new contiguous tensor, or ``t``)."""
    for dim, idx in ops:
        if idx.dim() == 1:
            t = t.index_select(dim, idx)
        else:  # [E, F]: stacked expert e's axis ``dim`` in its own order
            t = t.gather(dim, (idx[:, :, None] if dim == 1 else idx[:, None, :]).expand(*t.shape[:dim], -1,
                                                                                       *t.shape[dim + 1:]))
    return t.contiguous()


@torch.no_grad()
def permute_state(cfg, state: dict[str, torch.Tensor], perms: Permutations) -> dict[str, torch.Tensor]:
    """Apply the permutations to a state dict (names as in the HF checkpoint)."""
    ops = permutation_ops(cfg, perms)
    return {k: permute_tensor(v, ops.get(k, ())) for k, v in state.items()}


def sorted_entries(cfg, specs: dict, get, perms: Permutations) -> dict:
    """The sorted weights as lazy entries (hf_io.Lazy), each made when it is written: ``get(name)``
    (e.g. a memory-mapped reader's ``tensor``) reordered; ``specs``: name -> (dtype, shape), the
    tensors to sort (a permutation keeps both)."""
    from .hf_io import Lazy

    ops = permutation_ops(cfg, perms)

    def make(name):
        with torch.no_grad():
            return permute_tensor(get(name), ops.get(name, ()))

    return {n: Lazy(dt, tuple(shape), lambda n=n: make(n)) for n, (dt, shape) in specs.items()}


def permute_importance(cfg, imp: Importance, perms: Permutations) -> Importance:
    """The scores re-indexed like the sorted weights (descending along every prefix)."""
    layers = []
    for t, s, p in zip(cfg.layers_block_type, imp.layers, perms.layers):
        if t == "linear_attention":
            layers.append({"heads": s["heads"][p["heads"]], "channels": s["channels"][p["channels"]]})
        elif t == "full_attention":
            layers.append({"heads": s["heads"][p["heads"]]})
        elif t == "moe":
            pe = p["experts"]
            layers.append({"experts": s["experts"][pe], "expert_ffn": s["expert_ffn"][pe].gather(1, p["expert_ffn"][pe]),
                           "shared_ffn": s["shared_ffn"][p["shared_ffn"]]})
        else:
            layers.append({"ffn": s["ffn"][p["ffn"]]})
    return Importance(imp.hidden[perms.hidden], layers, imp.depth, imp.depth_order)


@torch.no_grad()
def sort_model(model, imp: Importance):
    """A new model with importance-sorted weights in rank-major head order, and the re-indexed scores.

    Returns ``(sorted_model, sorted_importance)``; the input model is left unchanged.
    """
    from .model import NemotronHForCausalLM

    cfg = model.config
    perms = permutations(cfg, imp)
    state = permute_state(cfg, model.state_dict(), perms)
    new_cfg = cfg.replace(head_order="rank_major")
    with torch.device("meta"):
        out = NemotronHForCausalLM(new_cfg)
    out.load_state_dict(state, assign=True)
    out.train(model.training)
    return out, permute_importance(cfg, imp, perms)
