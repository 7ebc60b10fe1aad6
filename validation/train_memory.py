"""Per-GPU memory of a training recipe: what each stage of training/trainer.py holds, for DDP and FSDP2.

Every term but the activations is a count (parameters from :func:`elastic_export.accounting.count_params`,
MoE aware; the router's from the router the trainer builds), at the dtypes the trainer uses:

- student weights: P x 4 (the trainer keeps float32 parameters; ``train.precision`` bf16 is autocast,
  and FSDP2's bf16 ``param_dtype`` is the all-gathered copy, so float32 *is* the master copy: no
  separate one);
- gradients: P x 4; AdamW: two float32 moments, P x 8 (its per-tensor ``step`` counters, 4 bytes per
  tensor, are left out: a few KB);
- teacher (elastic stages with ``distill.mode = "frozen"``): P x teacher bytes, no gradients, no
  optimizer state (the trainer's teacher is a float32 copy of the sorted parent; bf16 halves it);
- router: R x 4 weights (built for every stage), plus R x 12 gradients and moments in elastic stages
  while it is trained (``router.freeze_after`` not ``"start"``).

Activations (an estimate, saved for backward, per token of ``batch_size / N`` x ``seq_len`` at the
compute dtype, a = 4 float32 or 2 under bf16 autocast; the SSD scan and the loss in float32), per kept layer:

- every layer: 2d (the pre-norm's input and output) + d (the residual);
- Mamba2 (h heads x p, G groups x N state, chunk Q): in_proj output 2hp + 2GN + h, conv input and
  output 2(hp + 2GN), the chunked scan's intra-chunk decay and C.B matrices 2hQ + GQ, chunk states
  3hpN/Q, outputs and gated norm 5hp;
- attention (h query, nkv KV heads of hd): q, k, v and their head-grouped copies 2(h + 2 nkv) hd,
  output and o_proj input 2 h hd, plus h T scores when the kernel materializes them (``scores``;
  off for the fused SDPA kernels of a GPU);
- MLP (f): up output, activation output 2f; MoE (e experts of f_e, top k, shared s): router logits
  e, routed k x 2 f_e, shared 2s;
- the head: final norm 2d, per budget trained 3V float32 (logits, their float32 copy, log-softmax),
  plus the teacher's V float32 logits.
A step trains ``sandwich``: every budget over one graph, so layer activations scale by the sum of the
budget fractions (a budget's widths shrink with its fraction); ``uniform`` / ``weighted``: the largest, 1.
With activation checkpointing per layer only the layer inputs d per token are kept, plus one layer's
full activations recomputed in the backward.

DDP: everything replicated on each of N GPUs; activations at the per-GPU batch (batch_size / N).
FSDP2 (``train.parallel = "fsdp2"``: ``fully_shard`` per decoder layer, then the root, for the student
and the teacher; training/parallel.py): weights, gradients, moments and teacher divided by N (float32
shards; ``sum over ranks`` of the trainer's local shards equals N x these terms, tests/test_fsdp.py),
the router replicated, plus what is unsharded in flight: the root unit (embeddings + lm_head + final
norm) gathered at the compute dtype from the student's forward to the end of its backward, the layer
being computed and the next one prefetched at the compute dtype, and one unit's unsharded gradient (at
the compute dtype, plus its float32 copy for the reduction under bf16) before its reduce-scatter. On
one GPU too: FSDP2 gathers into a separate buffer whatever N is. The teacher's gathered root is freed
right after its forward. Activations as for DDP.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

GB = 1e9


@dataclass(frozen=True)
class StageMemory:
    stage: str
    gpus: int
    strategy: str  # "ddp" or "fsdp2"
    weights: float
    grads: float
    optimizer: float
    teacher: float
    router: float
    activations: float
    activations_ckpt: float
    in_flight: float

    @property
    def static(self) -> float:
        return self.weights + self.grads + self.optimizer + self.teacher + self.router + self.in_flight

    @property
    def total(self) -> float:
        return self.static + self.activations

    @property
    def total_ckpt(self) -> float:
        return self.static + self.activations_ckpt

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total, "total_ckpt": self.total_ckpt}


def router_params(cfg, recipe: dict) -> int:
    """Parameters of the router the trainer builds for ``recipe`` on ``cfg`` (a tiny MLP per axis)."""
    from training.recipe import make_space
    from training.router import Router

    r = Router(make_space(cfg, recipe), len(recipe["budgets"]["names"]), recipe["router"]["hidden"])
    return sum(p.numel() for p in r.parameters())


def layer_activations(cfg, i: int, tokens_per_seq: int, scores: bool) -> tuple[int, int]:
    """(elements saved per token at the compute dtype, float32 elements per token) of layer i."""
    d = cfg.hidden_size
    t = cfg.layers_block_type[i]
    a, f32 = 3 * d, 0
    if t == "linear_attention":
        h, p, G, N, Q = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size, cfg.chunk_size
        a += (2 * h * p + 2 * G * N + h) + 2 * (h * p + 2 * G * N) + 5 * h * p
        f32 += 2 * h * Q + G * Q + 3 * h * p * N // Q
    elif t == "full_attention":
        h, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        a += 2 * (h + 2 * nkv) * hd + 2 * h * hd
        f32 += h * tokens_per_seq if scores else h  # scores, or the fused kernel's log-sum-exp
    elif t == "moe":
        from elastic_export.elastic import moe_top_k

        e = cfg.n_routed_experts
        a += 2 * moe_top_k(cfg, e) * cfg.moe_intermediate_size + 2 * cfg.moe_shared_expert_intermediate_size
        f32 += e
    else:
        a += 2 * cfg.intermediate_size
    return a, f32


def activation_bytes(cfg, seq_len: int, batch: int, act_bytes: int, budgets: float, teacher: bool,
                     scores: bool, checkpointing: bool = False) -> float:
    """Saved-for-backward bytes of one step's forward at ``batch`` sequences of ``seq_len`` (see the module
    docstring); ``budgets``: the sum of the fractions of the budgets one step trains."""
    tok = batch * seq_len
    per = [layer_activations(cfg, i, seq_len, scores) for i in range(cfg.num_hidden_layers)]
    layer = [a * act_bytes + f * 4 for a, f in per]
    V, d = cfg.vocab_size, cfg.hidden_size
    head = tok * (budgets * (2 * d * act_bytes + 3 * V * 4) + (V * 4 if teacher else 0))
    if checkpointing:
        return head + tok * budgets * (cfg.num_hidden_layers * d * act_bytes + max(layer))
    return head + tok * budgets * sum(layer)


def fsdp2_in_flight(cfg, act: int) -> float:
    """Bytes FSDP2 holds unsharded at once (see the module docstring): the root unit for the whole step, two
    layers (computed + prefetched) at the compute dtype ``act``, one unit's gradient before its reduction."""
    from elastic_export.accounting import embedding_params, layer_params
    from elastic_export.elastic import full_subnet

    s = full_subnet(cfg)
    root = embedding_params(cfg, s.hidden)
    layer = max(layer_params(cfg, i, s.hidden, w) for i, w in enumerate(s.layers))
    grad = act + 4 if act != 4 else 4  # bf16 gradient + its float32 copy for the reduce-scatter
    return root * act + 2 * layer * act + max(root, layer) * grad


def stage_memory(cfg, recipe: dict, stage: dict, gpus: int, strategy: str, *, teacher_bytes: int = 4,
                 scores: bool | None = None, n_router: int | None = None, device: str = "cuda") -> StageMemory:
    """Per-GPU bytes of one stage of ``recipe`` on ``gpus`` GPUs with ``strategy`` ddp or fsdp2.

    ``device``: where it runs ("cuda": ``train.precision = "auto"`` is bf16 autocast, as the trainer
    picks on a bf16 GPU; "cpu": float32). ``scores``: whether attention materializes its scores [True
    in float32, False under bf16 (fused kernels)]."""
    from elastic_export.accounting import count_params
    from elastic_export.errors import ConfigError

    if strategy not in ("ddp", "fsdp2"):
        raise ConfigError(f"unknown strategy {strategy!r}", field="strategy", fix="use ddp or fsdp2")
    if gpus <= 0:
        raise ConfigError(f"must be positive, got {gpus}", field="--gpus")
    P = count_params(cfg)
    elastic = stage["kind"] == "elastic"
    teacher = elastic and recipe["distill"]["mode"] == "frozen"
    R = router_params(cfg, recipe) if n_router is None else n_router
    router_trained = elastic and recipe["router"]["freeze_after"] != "start"
    prec = recipe["train"]["precision"]
    bf16 = prec == "bf16" or (prec == "auto" and device == "cuda")
    act = 2 if bf16 else 4
    scores = (not bf16) if scores is None else scores
    if stage["batch_size"] % gpus:
        raise ConfigError(f"{stage['batch_size']} is not divisible by {gpus} GPUs", field=f"stage {stage['name']!r} "
                          "batch_size", fix="choose a GPU count that divides every stage's batch_size")
    mb = stage["batch_size"] // gpus // recipe["train"]["grad_accum"]
    fractions = recipe["budgets"]["fractions"]
    share = (sum(fractions) if stage.get("sampling") == "sandwich" else max(fractions)) if elastic else 1.0
    acts = [activation_bytes(cfg, stage["seq_len"], mb, act, share, teacher, scores, ck) for ck in (False, True)]
    div = gpus if strategy == "fsdp2" else 1
    flight = fsdp2_in_flight(cfg, act) if strategy == "fsdp2" else 0.0
    return StageMemory(stage["name"], gpus, strategy, P * 4 / div, P * 4 / div, P * 8 / div,
                       P * teacher_bytes / div if teacher else 0.0, R * (16 if router_trained else 4),
                       acts[0], acts[1], flight)


def plan_training(cfg, recipe: dict, gpus: list[int], teacher_bytes: int = 4) -> list[dict]:
    """Every stage x strategy x GPU count: StageMemory.to_dict() rows."""
    rows = []
    n_router = router_params(cfg, recipe)
    for s in recipe["stages"]:
        for strategy in ("ddp", "fsdp2"):
            for n in gpus:
                rows.append(stage_memory(cfg, recipe, s, n, strategy, teacher_bytes=teacher_bytes,
                                         n_router=n_router).to_dict())
    return rows


def training_plan_text(rows: list[dict], devices=(80, 141), params: int | None = None) -> str:
    """A table per stage: per-GPU GB of each term, the totals without / with activation checkpointing,
    and which of ``devices`` (GB, less the planner's data-center reserve) each fits."""
    from validation.planner import device_profile

    profs = [device_profile(f"{g}") for g in devices]
    lines = [f"student {params / 1e9:.2f}B parameters" if params else ""]
    stage = None
    for r in rows:
        if r["stage"] != stage:
            stage = r["stage"]
            lines += ["", f"stage {stage}: per-GPU GB (total / with activation checkpointing)",
                      f"  {'strategy':<6} {'GPUs':>4} {'weights':>8} {'grads':>8} {'AdamW':>8} {'teacher':>8} "
                      f"{'flight':>7} {'activ.':>8} {'act.ckpt':>8} {'total':>8} {'ckpt':>8}  "
                      + "  ".join(f"fits {p.memory_gb:g}GB" for p in profs)]
        fits = ["/".join("yes" if t <= p.usable_bytes else "no" for t in (r["total"], r["total_ckpt"]))
                for p in profs]
        lines.append(f"  {r['strategy']:<6} {r['gpus']:>4} " + " ".join(
            f"{r[k] / GB:>8.2f}" for k in ("weights", "grads", "optimizer", "teacher"))
            + f" {r['in_flight'] / GB:>7.2f} {r['activations'] / GB:>8.2f} {r['activations_ckpt'] / GB:>8.2f} "
            f"{r['total'] / GB:>8.2f} {r['total_ckpt'] / GB:>8.2f}  " + "  ".join(f"{f:>11}" for f in fits))
    lines += ["", "fits: without / with activation checkpointing, on the usable memory (less 1 GB + 5% reserve); "
              "teacher float32 as the trainer holds it; router weights are counted in the total"]
    return "\n".join(lines).lstrip("\n")
