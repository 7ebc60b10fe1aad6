"""Parameter and memory accounting of a budget, from the config alone (no weights, no device).

Counts follow the module shapes of :mod:`elastic_export.model` exactly (a test checks them against
a meta-device model and against sliced checkpoints), so they hold at any scale:

- embeddings V*d, lm_head V*d unless tied, final norm d;
- each kept layer: its pre-norm d plus
  - Mamba2 (h heads x p channels, G groups, N state, K conv): in_proj d*(2hp + 2GN + h),
    conv (hp + 2GN)*K, dt_bias/A_log/D 3h, gated norm hp, out_proj hp*d (+ biases);
  - attention (h query heads, nkv KV heads, head dim hd): (h + 2 nkv)*hd*d + d*h*hd (never biases);
  - MLP (f neurons): 2*f*d (+ biases);
  - MoE (e routed experts of f neurons, shared expert of s, din = moe_latent_size or d): router e*d,
    experts e*2*f*din, shared expert 2*s*d (+ biases), latent projections 2*L*d (+ biases). Its
    ``e_score_correction_bias`` is a buffer, not a parameter (as transformers counts).

Active parameters (what one token computes with): the same, with the routed experts counted
top_k = elastic.moe_top_k(cfg, e) times instead of e (the router, the shared expert and the latent
projections are active for every token). Equal to the total for a model without MoE layers.

Memory at a context length T and batch b:
- weights: parameters x bytes of the dtype, MoE routers (weight and score bias) at float32 (they stay
  float32 at every precision); every expert is resident, active or not;
- KV cache: per kept attention layer 2 * b * nkv * T * hd at the dtype;
- SSM state: per kept Mamba layer b * h * p * N in float32 (float32 at every precision);
- conv state: per kept Mamba layer b * (hp + 2GN) * (K-1) at the dtype;
- activations (an estimate of the prefill peak): b * T * (2d + widest layer intermediate) at the
  dtype plus the last position's float32 logits b * V. Attention scores are not counted (SDPA's
  fused kernels do not materialize them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig
from .elastic import LayerWidths, Subnet, full_subnet, moe_top_k

DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, torch.float8_e4m3fn: 1}
QUANT_DTYPES = ("int8", "int4", "fp8")  # quantized weights (elastic_export.quant); compute at bfloat16
QUANT_COMPUTE_BYTES = 2  # KV cache, conv state and activations of a quantized model: bfloat16


def quantized_weight_bytes(cfg: ModelConfig, subnet: Subnet | None = None, fmt: str = "int4",
                           plan: dict[str, int] | None = None, block: int | None = None) -> int:
    """Exact weight bytes of a budget quantized to ``fmt`` as ``quantize`` / ``slice`` hold them:
    per quantized tensor N*K*bits/8 of codes plus N*K/b float32 scales, every other tensor (norms,
    conv, A_log, D, dt_bias, biases, MoE routers) float32. ``plan``: the family's blocks
    (quant.quant_plan over every budget, or a quantized checkpoint's manifest); None plans this budget
    alone at ``block`` (the format's default)."""
    from .hf_io import expected_shapes
    from .quant import FORMATS, QuantSpec, budget_plan, quant_plan, quantizable
    from .slicing import sliced_config

    subnet = subnet or full_subnet(cfg)
    spec = QuantSpec(fmt, block)
    if plan is None:
        plan = quant_plan(cfg, {"budget": subnet}, expected_shapes(cfg), spec)
    blocks = budget_plan(cfg, subnet, plan)
    bits = FORMATS[fmt].bits
    total = 0
    for name, shape in expected_shapes(sliced_config(cfg, subnet)).items():
        n = 1
        for x in shape:
            n *= x
        if name in blocks and quantizable(name, spec):
            total += n * bits // 8 + n // blocks[name] * 4
        else:
            total += n * 4
    return total


def dtype_bytes(dtype: str | torch.dtype) -> int:
    from .hf_io import parse_dtype

    return DTYPE_BYTES[parse_dtype(dtype)]


def embedding_params(cfg: ModelConfig, d: int) -> int:
    """Embeddings, lm_head (unless tied) and the final norm at embedding width d."""
    return cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2) + d


def moe_params(cfg: ModelConfig, d: int, w: LayerWidths, routed: int) -> int:
    """A MoE mixer's parameters with ``routed`` of its ``w.experts`` experts counted (all of them for
    the total, top-k for the active count)."""
    din = d if cfg.moe_latent_size is None else cfg.moe_latent_size
    n = w.experts * d + routed * 2 * w.expert_ffn * din + 2 * w.shared_ffn * d
    if cfg.mlp_bias:
        n += w.shared_ffn + d
    if cfg.moe_latent_size is not None:
        n += 2 * cfg.moe_latent_size * d + (cfg.moe_latent_size + d if cfg.mlp_bias else 0)
    return n


def active_layer_params(cfg: ModelConfig, i: int, d: int, w: LayerWidths) -> int:
    """Parameters of layer i that one token computes with: layer_params with a MoE layer's routed
    experts counted top-k times."""
    if not w.kept or cfg.layers_block_type[i] != "moe":
        return layer_params(cfg, i, d, w)
    return d + moe_params(cfg, d, w, moe_top_k(cfg, w.experts))


def layer_params(cfg: ModelConfig, i: int, d: int, w: LayerWidths) -> int:
    """Parameters of layer i (its pre-norm included) at embedding width d and widths w; 0 if skipped."""
    if not w.kept:
        return 0
    t = cfg.layers_block_type[i]
    n = d  # the block's pre-norm
    if t == "linear_attention":
        h, p, GN, K = w.mamba_heads, w.mamba_head_dim, cfg.n_groups * cfg.ssm_state_size, cfg.conv_kernel
        proj = 2 * h * p + 2 * GN + h
        n += d * proj + (hp_conv := h * p + 2 * GN) * K + 3 * h + h * p + h * p * d
        if cfg.use_conv_bias:
            n += hp_conv
        if cfg.use_bias:
            n += proj + d
    elif t == "full_attention":
        hd, nkv, h = cfg.head_dim, cfg.num_key_value_heads, w.attn_heads
        n += (h + 2 * nkv) * hd * d + d * h * hd  # attention_bias is ignored, as in transformers
    elif t == "moe":
        n += moe_params(cfg, d, w, w.experts)
    else:
        n += 2 * w.ffn * d
        if cfg.mlp_bias:
            n += w.ffn + d
    return n


def count_params(cfg: ModelConfig, subnet: Subnet | None = None) -> int:
    """Parameters of a budget (the parent when ``subnet`` is None), as a standalone model would hold."""
    subnet = subnet or full_subnet(cfg)
    d = subnet.hidden
    return embedding_params(cfg, d) + sum(layer_params(cfg, i, d, w) for i, w in enumerate(subnet.layers))


def count_active_params(cfg: ModelConfig, subnet: Subnet | None = None) -> int:
    """Active parameters of a budget (per token: MoE layers count their top-k routed experts)."""
    subnet = subnet or full_subnet(cfg)
    d = subnet.hidden
    return embedding_params(cfg, d) + sum(active_layer_params(cfg, i, d, w) for i, w in enumerate(subnet.layers))


def moe_summary(cfg: ModelConfig, subnet: Subnet | None = None) -> dict:
    """For a model with MoE layers: the budget's active parameters and, per kept MoE layer, the routed
    experts kept and used per token (reports and validation); {} for a dense model."""
    if not cfg.has_moe:
        return {}
    subnet = subnet or full_subnet(cfg)
    experts = [(w.experts, moe_top_k(cfg, w.experts)) for t, w in zip(cfg.layers_block_type, subnet.layers)
               if t == "moe" and w.kept]
    return {"active_params": count_active_params(cfg, subnet), "experts": [e for e, _ in experts],
            "experts_per_token": [k for _, k in experts]}


def router_sizes(cfg: ModelConfig, subnet: Subnet | None = None) -> tuple[int, int]:
    """(router weight parameters, score-bias buffer entries) of the kept MoE layers: float32 at every dtype."""
    subnet = subnet or full_subnet(cfg)
    experts = [w.experts for t, w in zip(cfg.layers_block_type, subnet.layers) if t == "moe" and w.kept]
    return sum(experts) * subnet.hidden, sum(experts)


@dataclass(frozen=True)
class Memory:
    """Bytes of one budget at a context length and batch size (``active_params``: per token)."""
    params: int
    weights: int
    kv_cache: int
    ssm_state: int
    conv_state: int
    activations: int
    active_params: int = 0

    @property
    def state(self) -> int:
        return self.kv_cache + self.ssm_state + self.conv_state

    @property
    def total(self) -> int:
        return self.weights + self.state + self.activations


def memory(cfg: ModelConfig, subnet: Subnet | None = None, dtype: str | torch.dtype = "bfloat16",
           context: int = 8192, batch: int = 1, quant_plan: dict[str, int] | None = None) -> Memory:
    """Weights, caches and an activation estimate of a budget (see the module docstring). ``dtype``
    int8 / int4 / fp8: quantized weights (:func:`quantized_weight_bytes`, with the family's
    ``quant_plan`` when given), everything else at bfloat16."""
    subnet = subnet or full_subnet(cfg)
    quantized = isinstance(dtype, str) and dtype in QUANT_DTYPES
    nb = QUANT_COMPUTE_BYTES if quantized else dtype_bytes(dtype)
    d = subnet.hidden
    params = count_params(cfg, subnet)
    GN, K = cfg.n_groups * cfg.ssm_state_size, cfg.conv_kernel
    kv = ssm = conv = 0
    widest = 0
    for t, w in zip(cfg.layers_block_type, subnet.layers):
        if not w.kept:
            continue
        if t == "linear_attention":
            hp = w.mamba_heads * w.mamba_head_dim
            ssm += batch * hp * cfg.ssm_state_size * 4
            conv += batch * (hp + 2 * GN) * (K - 1) * nb
            widest = max(widest, 2 * hp + 2 * GN + w.mamba_heads)
        elif t == "full_attention":
            kv += 2 * batch * cfg.num_key_value_heads * context * cfg.head_dim * nb
            widest = max(widest, (w.attn_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim)
        elif t == "moe":  # the gathered and the weighted expert rows [T*k, din], the shared expert's neurons
            din = d if cfg.moe_latent_size is None else cfg.moe_latent_size
            widest = max(widest, 2 * moe_top_k(cfg, w.experts) * din + w.shared_ffn)
        else:
            widest = max(widest, w.ffn)
    act = batch * context * (2 * d + widest) * nb + batch * cfg.vocab_size * 4
    router, score_bias = router_sizes(cfg, subnet)
    weights = (params - router) * nb + (router + score_bias) * 4
    if quantized:
        weights = quantized_weight_bytes(cfg, subnet, dtype, quant_plan)
    return Memory(params=params, weights=weights, kv_cache=kv, ssm_state=ssm, conv_state=conv,
                  activations=act, active_params=count_active_params(cfg, subnet))


def family_weights(cfg: ModelConfig, subnets: list[Subnet], dtype: str | torch.dtype = "bfloat16") -> dict:
    """Weight bytes of a nested family (one copy of the parent: every budget is a prefix of it)
    against separate models (one copy per budget)."""
    nb = dtype_bytes(dtype)
    counts = [count_params(cfg, s) for s in subnets]
    return {"nested": count_params(cfg) * nb, "separate": sum(counts) * nb, "per_budget": [c * nb for c in counts]}
