"""The trainer: setup -> stages -> nested checkpoint, on 1 process or N (torchrun; DDP or FSDP2).

One step of an ``elastic`` stage (Nemotron Elastic, Eq. 17):
1. the step's plan: one budget drawn by the sampler (the same on every rank: a function of (seed,
   step)), or every budget (``sandwich``), all over one teacher forward;
2. the full budget runs the parent; any other budget either runs its fixed architecture (once the
   router is frozen, ``router.freeze_after``) or asks the router for hard Gumbel-Softmax choices and
   runs them through the weight views with straight-through gates;
3. loss = KD(teacher -> student) [+ alpha * CE in trainable-teacher mode] + lambda * budget loss (on
   the expected cost under the router's probabilities), weighted over the planned budgets.
At the freeze and at the end every budget's configuration is repaired into its tolerance band by
importance (``ElasticSpace.repair``), nested in the next larger one with ``router.nested``.
A ``pretrain`` stage trains the parent alone with cross-entropy.

Exact resume: data windows, budget draws and Gumbel noise are functions of (seed, step), so the
checkpoint holds model, router, optimizer, the frozen teacher, the depth ranking and the step;
the learning rates and the Gumbel schedule are functions of the step too.
Multi-process: the global batch of a step is split over ranks x gradient-accumulation micro-batches;
DDP averages gradients (gloo on CPU, NCCL on GPU); rank 0 evaluates, logs and writes checkpoints.
``train.parallel = "fsdp2"`` shards student and teacher instead (training/parallel.py): gradients are
reduce-scattered (averaged like DDP's), the replicated router's are all-reduced here; the sharded
state is written by every rank (torch.distributed.checkpoint); rank 0 evaluates and writes the nested
checkpoint from the gathered full weights.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from elastic_export.accounting import count_active_params, count_params
from elastic_export.elastic import Subnet, full_subnet, validate_subnet
from elastic_export.errors import ConfigError
from elastic_export.hf_io import atomic_write_bytes

from . import checkpoint as ckpt
from . import parallel
from .data import build_mixture
from .distill import ce_loss, distill_loss
from .recipe import load_recipe, make_space, parent_config
from .router import Router, budget_loss, gumbel_schedule
from .sampler import BudgetSampler
from elastic_export.tasks import answer_loss, evaluate as evaluate_tasks, make_tasks


@dataclass
class Stage:
    index: int
    spec: dict
    start: int  # first global step
    steps: int
    window_offset: int  # windows consumed by earlier stages

    @property
    def end(self) -> int:
        return self.start + self.steps


def plan_stages(stages: list[dict]) -> list[Stage]:
    out, step, windows = [], 0, 0
    for i, s in enumerate(stages):
        n = max(1, s["tokens"] // (s["batch_size"] * s["seq_len"]))
        out.append(Stage(i, s, step, n, windows))
        step += n
        windows += n * s["batch_size"]
    return out


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


class ElasticStep(nn.Module):
    """Model + router behind one forward, so that DDP synchronizes both.

    One call runs every budget of the step's plan (one budget for the paper's per-step sampling, all of
    them for ``sandwich``) over the same batch and the same teacher logits, and returns the weighted sum
    of their losses: one backward, one DDP synchronization.
    """

    def __init__(self, model, router: Router, recipe: dict):
        super().__init__()
        self.model, self.router = model, router
        self.space = router.space
        ro = recipe["router"]
        self.metric, self.context = ro["budget_metric"], ro["memory_context"]
        self.lam, self.tol = ro["lambda"], ro["tolerance"]
        self.expected = ro["budget_cost"] == "expected"
        self.distill = recipe["distill"]
        full = full_subnet(model.config)
        self.full_cost = self.space.subnet_cost(full, self.metric, self.context)
        self.full_active = count_active_params(model.config)  # compute per token (= parameters without MoE)

    def forward(self, x, y, kind: str, plan: list, tau: float, scale: float, noise_seed: int, teacher_logits=None):
        """``plan``: [(budget index, fraction, loss weight, fixed Subnet or None)]. Returns (loss, stats
        [len(plan), 4] = task loss, budget loss, cost fraction, active-parameter share of the architecture run)."""
        one = x.new_ones((), dtype=torch.float32)
        if kind == "pretrain":
            loss = ce_loss(self.model(x), y)
            return loss, torch.stack([loss.detach(), one * 0, one, one])[None]
        dm = self.distill
        total, stats = 0.0, []
        for budget, fraction, weight, fixed in plan:
            bl = one * 0
            if fraction >= 1.0:  # the full budget is the parent itself (not routed)
                logits = self.model(x)
                task = distill_loss(logits, logits if teacher_logits is None else teacher_logits, y, dm["mode"],
                                    dm["temperature"], dm["alpha"], same=teacher_logits is None)
                loss, frac, share = task, 1.0, 1.0
            else:
                if fixed is not None:  # router frozen: the budget's fixed architecture, no gates
                    sub = fixed
                    logits = self.model(x, subnet=sub)
                else:
                    gen = torch.Generator().manual_seed(noise_seed * 31 + budget)
                    y_st, index = self.router.sample(budget, tau, scale, gen)
                    sub = self.space.subnet(index)
                    logits = self.model(x, subnet=sub, gates=self.space.gates(y_st, index))
                    widths = self.space.expected_widths(self.router.probabilities(budget)) if self.expected \
                        else self.space.soft_widths(y_st)
                    cost = self.space.cost(widths, self.metric, self.context)
                    bl = budget_loss(cost, fraction * self.full_cost, self.tol)
                frac = self.space.subnet_cost(sub, self.metric, self.context) / self.full_cost
                share = count_active_params(self.model.config, sub) / self.full_active
                t_logits = teacher_logits
                if t_logits is None:  # trainable teacher: the model's own full budget
                    t_logits = self.model(x)
                task = distill_loss(logits, t_logits, y, dm["mode"], dm["temperature"], dm["alpha"])
                loss = task + self.lam * bl
            total = total + weight * loss
            stats.append(torch.stack([task.detach().float(), bl.detach().float(), one * frac, one * share]))
        return total, torch.stack(stats)


class Trainer:
    def __init__(self, recipe: dict, out: str | Path | None = None, progress: bool | None = None):
        self.r = recipe
        self.out = Path(out or recipe["out"])
        tr = recipe["train"]
        if tr["threads"] > 0:
            torch.set_num_threads(tr["threads"])
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.distributed = self.world > 1
        self.fsdp = tr["parallel"] == "fsdp2"
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            self.device = torch.device("cuda", local)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.owns_group = parallel.init_group(self.world, self.device) if self.distributed or self.fsdp else False
        prec = tr["precision"]
        self.bf16 = prec == "bf16" or (prec == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        self.main = self.rank == 0
        if self.fsdp:  # bf16 on a GPU: FSDP2's mixed precision (bf16 gathered parameters), not autocast
            self.mesh, self.mp = parallel.make_mesh(self.device), parallel.mp_policy(self.bf16)
        self.progress = tr["progress"] if progress is None else progress

        from elastic_export.tokenizer import load_tokenizer

        tok = recipe["model"]["tokenizer"]
        self.tokenizer = load_tokenizer(None if tok == "byte" else tok)
        self.mixture = build_mixture(recipe["data"], self.tokenizer, recipe["seed"])
        self.cfg = parent_config(recipe)
        if self.fsdp and not self.main:  # FSDP2: only rank 0 builds or loads the parent (sharded_model)
            self.model = None
        elif recipe["model"]["init"] == "scratch":
            from elastic_export.model import build_model

            self.model = build_model(self.cfg, seed=recipe["seed"])
        elif (Path(recipe["model"]["init"]) / "elastic.json").is_file():  # derive new budgets from a nested one
            from elastic_export.nested import load_nested

            self.model = load_nested(recipe["model"]["init"]).model.train()
        else:
            from elastic_export.hf_io import load

            self.model = load(recipe["model"]["init"])
        self.parent_dtype = None
        if self.model is not None:
            self.parent_dtype = self.model.dtype  # output.dtype "parent" saves the result as the parent is stored
            self.model.float()  # trained in float32
        if self.tokenizer.vocab_size > self.cfg.vocab_size:
            raise ConfigError(f"the tokenizer has {self.tokenizer.vocab_size} ids, the parent {self.cfg.vocab_size}",
                              field="model.tokenizer")
        if self.model is not None and not self.fsdp:
            self.model.to(self.device)
        self.space = make_space(self.cfg, recipe)
        torch.manual_seed(recipe["seed"])
        self.router = Router(self.space, len(recipe["budgets"]["names"]), recipe["router"]["hidden"]).to(self.device)
        if self.fsdp and self.distributed:  # replicated outside FSDP2: rank 0's values everywhere (DDP does this)
            for t in self.router.state_dict().values():
                dist.broadcast(t, 0)
        self.stages = plan_stages(recipe["stages"])
        self.total_steps = self.stages[-1].end
        first = [s for s in self.stages if s.spec["kind"] == "elastic"]
        self.elastic_start = first[0].start if first else None
        self.elastic_steps = sum(s.steps for s in first)
        freeze = recipe["router"]["freeze_after"]
        if freeze == "start":  # no router: architectures from the importance search at the elastic start
            self.freeze_step = self.elastic_start
        elif freeze is not None:
            idx = [s.spec["name"] for s in self.stages].index(freeze)
            self.freeze_step = self.stages[idx].end
        else:
            self.freeze_step = None
        # the Gumbel schedule anneals over the steps in which the router learns
        self.router_steps = sum(s.steps for s in first if self.freeze_step is None or s.end <= self.freeze_step)
        self.fixed: dict = {}  # budget name -> Subnet once the router is frozen
        self.importance = None  # sorted-order scores from the elastic start (the repair's preferences)
        for s in self.stages:
            if s.spec["batch_size"] % (self.world * tr["grad_accum"]):
                raise ConfigError(f"{s.spec['batch_size']} is not divisible by {self.world} processes x "
                                  f"grad_accum {tr['grad_accum']}", field=f"stages[{s.index}].batch_size")
        self._set_model(self.model, self.cfg)
        self.teacher = None
        self.step = 0
        self.elapsed = 0.0
        self.evals: list[dict] = []

    def _set_model(self, model, cfg=None) -> None:
        """(Re)build what wraps the model: the step module, DDP or FSDP2, and a fresh optimizer.

        FSDP2: ``model`` is rank 0's plain model (None on the other ranks, and on every rank for shards
        that a resume fills), ``cfg`` its config; the model becomes the sharded one."""
        cfg = cfg or model.config
        if self.fsdp:
            self.model = self.opt = None  # the previous shards and moments go before the new ones come
            self.model = parallel.sharded_model(cfg, self.mesh, self.mp, self.device, model)
        else:
            self.model = model.to(self.device)
        self.model.checkpoint_layers = self.r["train"]["activation_checkpointing"]
        self.cfg = cfg
        self.space.cfg = cfg
        self.step_module = ElasticStep(self.model, self.router, self.r)
        self.ddp = nn.parallel.DistributedDataParallel(self.step_module, find_unused_parameters=True) \
            if self.distributed and not self.fsdp else self.step_module
        params_m = list(self.model.parameters())
        self.opt = torch.optim.AdamW([
            {"params": [p for p in params_m if p.dim() >= 2], "weight_decay": 0.0},
            {"params": [p for p in params_m if p.dim() < 2], "weight_decay": 0.0},
            {"params": list(self.router.parameters()), "weight_decay": 0.0},
        ], lr=1e-3, betas=(0.9, 0.95))

    # ---- state ---------------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoint"

    def _run_state(self) -> dict:
        """Everything of the training state but the model, router and optimizer tensors."""
        return {"step": self.step, "elapsed": self.elapsed, "rng": ckpt.rng_states(),
                "depth_ranking": self.space.depth_ranking, "evals": self.evals, "recipe": self.r["name"],
                "head_order": self.cfg.head_order, "fixed": {n: b.to_dict() for n, b in self.fixed.items()},
                "importance": None if self.importance is None else self.importance.to_tensors(),
                "parallel": self.r["train"]["parallel"]}

    def save(self) -> None:
        if self.fsdp:
            return self._save_sharded()
        if not self.main:
            return
        ckpt.save_state(self.ckpt_dir, {**self._run_state(), "model": self.model.state_dict(),
                                        "router": self.router.state_dict(), "optimizer": self.opt.state_dict()})

    # FSDP2: model, router and AdamW moments are DCP tensors keyed by name (every rank its shards); the
    # JSON says which parameters have moments, so a resume rebuilds exactly those (none are invented).
    def _named_params(self) -> dict:
        return {**{f"model.{n}": p for n, p in self.model.named_parameters()},
                **{f"router.{n}": p for n, p in self.router.named_parameters()}}

    def _sharded_state(self, moments: dict) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        params = self._named_params()
        optim = {}
        for name, keys in moments.items():
            st = self.opt.state[params[name]]
            optim.update({f"{name}.{k}": st[k] for k in keys})
        return {"model": get_model_state_dict(self.model), "router": self.router.state_dict(), "optim": optim}

    def _save_sharded(self) -> None:
        moments = {n: sorted(self.opt.state[p]) for n, p in self._named_params().items() if self.opt.state.get(p)}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]
        rest = {**self._run_state(), "world": self.world, "moments": moments, "param_groups": groups}
        parallel.save_sharded(self.ckpt_dir, self._sharded_state(moments), lambda d: ckpt.write_state(d, rest))

    def _resume_sharded(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        params = self._named_params()
        for name, keys in state["moments"].items():  # AdamW's own layout: step (a CPU scalar), two moments
            p = params[name]
            self.opt.state[p] = {k: torch.zeros((), dtype=torch.float32) if k == "step" else torch.zeros_like(p)
                                 for k in keys}
        tensors = self._sharded_state(state["moments"])
        parallel.load_sharded(self.ckpt_dir, tensors)
        set_model_state_dict(self.model, tensors["model"])
        self.router.load_state_dict(tensors["router"])
        for g, saved in zip(self.opt.param_groups, state["param_groups"]):
            g.update(saved)

    def resume(self) -> bool:
        state = ckpt.load_state(self.ckpt_dir)
        if state is None:
            return False
        if state.get("recipe") != self.r["name"]:
            raise ConfigError(f"{self.ckpt_dir} belongs to recipe {state.get('recipe')!r}", field="out",
                              fix="use another output directory or delete the old run")
        written = state.get("parallel", "ddp")
        if written != self.r["train"]["parallel"]:
            raise ConfigError(f"{self.ckpt_dir} was written with train.parallel = {written!r}, this run has "
                              f"{self.r['train']['parallel']!r}", field="train.parallel",
                              fix=f"resume with train.parallel = {written!r}, or start over (--fresh)")
        if state.get("head_order", self.cfg.head_order) != self.cfg.head_order:  # sorted at the elastic start
            from elastic_export.model import NemotronHForCausalLM

            cfg = self.cfg.replace(head_order=state["head_order"])
            self._set_model(None if self.fsdp else NemotronHForCausalLM(cfg), cfg)
        if self.fsdp:
            self._resume_sharded(state)
        else:
            self.model.load_state_dict(state["model"])
            self.router.load_state_dict(state["router"])
            self.opt.load_state_dict(state["optimizer"])
        ckpt.set_rng_states(state["rng"])
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.space.depth_ranking = list(state["depth_ranking"])
        self.evals = state.get("evals", [])
        self.fixed = {n: Subnet.from_dict(d) for n, d in state.get("fixed", {}).items()}
        if state.get("importance") is not None:
            from elastic_export.importance import Importance

            self.importance = Importance.from_tensors(state["importance"], self.cfg.num_hidden_layers)
        if self.elastic_start is not None and self.step > self.elastic_start and self.r["distill"]["mode"] == "frozen":
            if self.fsdp:
                self.teacher = parallel.empty_sharded(self.cfg, self.mesh, self.mp, self.device, trainable=False)
                self._teacher_state(load=True)
            else:
                self.teacher = self._new_teacher()
                self.teacher.load_state_dict(ckpt.load_state(self.out / "teacher")["model"])
        self._truncate_metrics()
        return True

    def _truncate_metrics(self) -> None:
        f = self.out / "metrics.jsonl"
        if not self.main or not f.is_file():
            return
        keep = [l for l in f.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= self.step]
        atomic_write_bytes(f, ("\n".join(keep) + "\n" if keep else "").encode())

    def log(self, record: dict) -> None:
        if self.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _new_teacher(self):
        if self.fsdp:
            return parallel.sharded_copy(self.model, self.mesh, self.mp, self.device).eval()
        t = copy.deepcopy(self.model).eval()
        for p in t.parameters():
            p.requires_grad_(False)
        return t

    def _teacher_state(self, load: bool = False) -> None:
        """FSDP2: write (once, at the elastic start) or read the sharded teacher, ``OUT/teacher/``."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        tensors = {"model": get_model_state_dict(self.teacher)}
        if load:
            parallel.load_sharded(self.out / "teacher", tensors)
            set_model_state_dict(self.teacher, tensors["model"])
            self.teacher.eval()
        else:
            parallel.save_sharded(self.out / "teacher", tensors,
                                  lambda d: ckpt.write_state(d, {"head_order": self.cfg.head_order}))

    # ---- elastic phase start -------------------------------------------------------------------
    def _begin_elastic(self) -> None:
        """At the first elastic step: rank and sort the parent by importance (function preserving, so
        every budget is a prefix of the most important components), freeze it as the teacher, and take
        the depth ranking (Eq. 5) from the same calibration passes. The optimizer starts afresh."""
        from elastic_export.importance import compute_importance
        from elastic_export.sorting import sort_model

        s = self.stages[[st.start for st in self.stages].index(self.elastic_start)].spec
        n = self.r["router"]["calibration_windows"]
        calib = self.mixture.batch(range(2 * 10**9, 2 * 10**9 + n), min(s["seq_len"], 512))[:, :-1]
        ro = self.r["router"]  # Eq. 5 one-shot or iterative; Eq. 4 over the top head_channels channels (all: None)
        depth = ro["depth_mode"] if "depth" in self.space.axes else "none"
        if self.fsdp:  # rank 0 ranks and sorts the gathered parent; its scores go to every rank, its weights to the shards
            from elastic_export.importance import Importance

            plain = parallel.gather(self.model)
            sorted_model, imp = None, None
            if self.main:
                imp = compute_importance(plain.to(self.device), calib.to(self.device), depth=depth,
                                         head_channels=ro["head_channels"])
                imp = Importance.from_tensors(imp.to_tensors(), self.cfg.num_hidden_layers)  # on the CPU
                sorted_model, imp = sort_model(plain.cpu(), imp)  # sorted on the CPU: one whole copy on the GPU at most
                del plain
            scores = parallel.broadcast_tensors(None if imp is None else imp.to_tensors(), self.device)
            imp = Importance.from_tensors(scores, self.cfg.num_hidden_layers)
            self._set_model(sorted_model, self.cfg.replace(head_order="rank_major"))  # as sort_model's config
        else:
            imp = compute_importance(self.model, calib.to(self.device), depth=depth, head_channels=ro["head_channels"])
            sorted_model, imp = sort_model(self.model, imp)
            self._set_model(sorted_model)
        self.importance = imp
        if "depth" in self.space.axes and self.r["router"]["depth_ranking"] is None:
            self.space.depth_ranking = list(imp.depth_order)
        if self.r["distill"]["mode"] == "frozen":
            self.teacher = self._new_teacher()
            if self.fsdp:
                self._teacher_state()
            elif self.main:
                ckpt.save_state(self.out / "teacher", {"model": self.teacher.state_dict(),
                                                       "head_order": self.cfg.head_order})
        if self.main:
            self.log({"step": self.step, "event": "elastic_start", "depth_ranking": self.space.depth_ranking})
        if self.freeze_step == self.elastic_start:
            self.freeze_router(from_largest=True)

    # ---- one step ------------------------------------------------------------------------------
    def train_step(self, stage: Stage) -> dict:
        s, tr, ro = stage.spec, self.r["train"], self.r["router"]
        local = self.step - stage.start
        f = lr_factor(local, stage.steps, s["warmup_steps"], s["min_lr_ratio"])
        lr = s["lr"] * f
        elastic = s["kind"] == "elastic"
        e_step = self.step - self.elastic_start if elastic else 0
        router_lr = ro["lr"] * min(1.0, (e_step + 1) / max(1, ro["warmup_steps"])) if elastic else 0.0
        for g, v in zip(self.opt.param_groups, (lr, lr, router_lr)):
            g["lr"] = v
        self.opt.param_groups[0]["weight_decay"] = s["weight_decay"]
        routed = elastic and not self.fixed
        tau, scale = gumbel_schedule(e_step / max(1, self.router_steps - 1), (ro["tau_start"], ro["tau_end"]),
                                     (ro["scale_start"], ro["scale_end"])) if routed else (1.0, 1.0)
        if not routed:
            self.opt.param_groups[2]["lr"] = router_lr = 0.0
        names = self.r["budgets"]["names"]
        plan = [(0, 1.0, 1.0, None)]
        if elastic:
            plan = self.step_plan(s)
        A = tr["grad_accum"]
        mb = s["batch_size"] // (self.world * A)
        base = stage.window_offset + local * s["batch_size"]
        loss_sum = torch.zeros((), dtype=torch.float64)
        stat_sum = torch.zeros(len(plan), 4, dtype=torch.float64)
        self.opt.zero_grad(set_to_none=True)
        for m in range(A):
            first = base + (self.rank * A + m) * mb
            batch = self.mixture.batch(range(first, first + mb), s["seq_len"]).to(self.device)
            x, y = batch[:, :-1], batch[:, 1:]
            sync = m == A - 1 or not self.distributed or self.fsdp  # FSDP2 reduce-scatters every micro-batch
            ctx = self.ddp.no_sync() if not sync else _null()
            with ctx, torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16 and not self.fsdp):
                t_logits = None
                if elastic and self.teacher is not None:
                    with torch.no_grad():
                        t_logits = self.teacher(x)
                    if self.fsdp:
                        self.teacher.reshard()  # the root unit stays gathered after a forward otherwise
                loss, stats = self.ddp(x, y, s["kind"], plan, tau, scale,
                                       self.r["seed"] * 1_000_003 + self.step + 17, t_logits)
                (loss / A).backward()
            loss_sum += float(loss.detach()) / A
            stat_sum += stats.double().cpu() / A
        if self.fsdp and self.distributed:
            self._average_router_grads()
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), tr["grad_clip"] if tr["grad_clip"] > 0 else math.inf)
        norm = parallel.full_value(norm)  # FSDP2: the norm over every rank's shards, the same on each
        # A step with no signal (the full budget while the student still equals the frozen teacher: KD = 0)
        # has only rounding noise as gradient, which Adam would scale up to a full learning-rate step in a
        # random direction (its second moment is as small as the noise). Such a step is skipped.
        skipped = elastic and float(norm) < 1e-6
        if not skipped:
            self.opt.step()
        if self.distributed:
            flat = torch.cat([loss_sum[None], stat_sum.flatten()])
            dist.all_reduce(flat)
            flat /= self.world
            loss_sum, stat_sum = flat[0], flat[1:].view_as(stat_sum)
        self.step += 1
        w = torch.tensor([p[2] for p in plan], dtype=torch.float64)
        mean = (stat_sum * w[:, None]).sum(0) / w.sum()  # loss-weighted over the planned budgets
        rec = {"step": self.step, "stage": s["name"], "kind": s["kind"],
               "budget": (names[plan[0][0]] if len(plan) == 1 else "all") if elastic else None,
               "loss": float(loss_sum), "task_loss": mean[0].item(), "budget_loss": mean[1].item(),
               "cost_frac": mean[2].item(), "lr": lr, "router_lr": router_lr, "tau": tau, "scale": scale,
               "tokens": s["batch_size"] * s["seq_len"],
               "forwards": self.step_forwards(stat_sum[:, 3].tolist(), elastic), "skipped": skipped}
        if elastic and len(plan) > 1:
            rec["budgets"] = {names[p[0]]: {"task_loss": stat_sum[k, 0].item(), "budget_loss": stat_sum[k, 1].item(),
                                            "cost_frac": stat_sum[k, 2].item()} for k, p in enumerate(plan)}
        return rec

    def _average_router_grads(self) -> None:
        """FSDP2: the replicated router's gradients averaged over the ranks (what DDP does for it)."""
        grads = [p.grad for p in self.router.parameters() if p.grad is not None]
        if grads:
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat)
            flat /= self.world
            for g, v in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(v.view_as(g))

    def memory_terms(self) -> dict:
        """Bytes this rank holds (its local shards under FSDP2): the student's weights, gradients and AdamW
        moments, the teacher, and the router's weights + gradients + moments (plan-memory's counted terms)."""
        def nbytes(ts):
            return sum(parallel.local(t).numel() * t.element_size() for t in ts if t is not None)

        def moments(ps):
            return [v for p in ps for k, v in self.opt.state.get(p, {}).items() if k != "step"]

        model, router = list(self.model.parameters()), list(self.router.parameters())
        return {"weights": nbytes(model), "grads": nbytes(p.grad for p in model), "optimizer": nbytes(moments(model)),
                "teacher": nbytes(self.teacher.parameters()) if self.teacher is not None else 0,
                "router": nbytes(router) + nbytes(p.grad for p in router) + nbytes(moments(router))}

    def log_memory(self, stage: Stage) -> None:
        """After a stage's first step: every rank's memory_terms (and its CUDA peak) in metrics.jsonl."""
        terms = self.memory_terms()
        if self.device.type == "cuda":
            terms["cuda_peak"] = torch.cuda.max_memory_allocated(self.device)
        ranks = parallel.all_gather_ints(list(terms.values()), self.device) if self.distributed else [list(terms.values())]
        self.log({"step": self.step, "event": "memory", "stage": stage.spec["name"],
                  "parallel": self.r["train"]["parallel"], "ranks": [dict(zip(terms, r)) for r in ranks]})

    def step_plan(self, s: dict) -> list:
        """The budgets one elastic step trains: [(index, fraction, loss weight, fixed Subnet or None)].

        ``uniform`` / ``weighted``: one budget per step, drawn from (seed, step) as the paper does.
        ``sandwich`` (our departure from the paper): every budget with a positive weight, each step, over
        one shared teacher forward; the loss is their weighted mean (weights default to equal).
        """
        names, fracs = self.r["budgets"]["names"], self.r["budgets"]["fractions"]

        def entry(b, weight):
            return (b, float(fracs[b]), weight, self.fixed.get(names[b]) if fracs[b] < 1.0 else None)

        if s["sampling"] == "sandwich":
            w = s["weights"] or [1.0] * len(names)
            return [entry(b, w[b] / sum(w)) for b in range(len(names)) if w[b] > 0]
        weights = s["weights"] if s["sampling"] == "weighted" else None
        return [entry(BudgetSampler(len(names), weights, self.r["seed"])(self.step), 1.0)]

    def step_forwards(self, shares, elastic: bool) -> float:
        """Compute of a step in full-model forward equivalents (a backward counts as two forwards, a
        budget's cost scales with the active-parameter share of the architecture it ran): teacher forward +
        3 x each student's share."""
        if not elastic:
            return 3.0
        return (1.0 if self.teacher is not None else 0.0) + 3.0 * float(sum(shares))

    # ---- evaluation ----------------------------------------------------------------------------
    def budget_subnets(self) -> dict:
        """The configuration of every budget: the frozen ones, or the router's argmax repaired now."""
        if self.fixed:
            return dict(self.fixed)
        return self.final_subnets()[0]

    def final_subnets(self, from_largest: bool = False) -> tuple[dict, dict]:
        """Each budget's router argmax, moved into its tolerance band by importance when ``router.repair``
        and kept inside the next larger budget when ``router.nested`` (largest budget first).
        ``from_largest``: start every budget from the largest configuration instead of the router's argmax
        (the importance search alone, ``router.freeze_after = "start"``).
        Returns (subnets by name, report by name: raw and final cost fractions, in band)."""
        ro = self.r["router"]
        names, fracs = self.r["budgets"]["names"], self.r["budgets"]["fractions"]
        full = self.space.subnet_cost(full_subnet(self.cfg), ro["budget_metric"], ro["memory_context"])
        out, report, upper = {}, {}, None
        for b in sorted(range(len(names)), key=lambda b: -fracs[b]):
            if fracs[b] >= 1.0:
                out[names[b]] = full_subnet(self.cfg)
                upper = self.space.extreme_index(True)
                continue
            raw = self.space.extreme_index(True) if from_largest else \
                {k: v.tolist() for k, v in self.router.argmax(b).items()}
            tol = ro["tolerance"] if ro["repair"] or from_largest else float("inf")
            idx, _ = self.space.repair(raw, fracs[b] * full, tol, ro["budget_metric"], ro["memory_context"],
                                       self.importance, upper if ro["nested"] else None)
            sub = self.space.subnet(idx)

            def share(s):
                return self.space.subnet_cost(s, ro["budget_metric"], ro["memory_context"]) / full

            final = share(sub)
            report[names[b]] = {"raw": share(self.space.subnet(raw)), "final": final, "target": fracs[b],
                                "in_band": abs(final / fracs[b] - 1) <= ro["tolerance"]}
            out[names[b]] = sub
            upper = idx
        return {n: out[n] for n in names}, report

    def freeze_router(self, from_largest: bool = False) -> None:
        """Fix every budget's architecture (repaired argmax); later stages train these, not the router."""
        self.fixed, report = self.final_subnets(from_largest)
        self._warn_out_of_band(report)
        self.log({"step": self.step, "event": "router_frozen", "budgets": report})

    def evaluate(self, stage: Stage, elastic: bool) -> dict | None:
        """Rank 0 evaluates every budget; under FSDP2 every rank calls this (the full weights are gathered
        to rank 0, which evaluates them on its device, then drops them) and the others get None."""
        model = self.model
        if self.fsdp:
            model = parallel.gather(self.model)
            if not self.main:
                return None
            model.to(self.device)
        subnets = self.budget_subnets() if elastic else {"parent": full_subnet(self.cfg)}
        d = self.r["data"]
        seq = max(s.spec["seq_len"] for s in self.stages)  # one length for every evaluation of the run
        result = evaluate_budgets(model, subnets, self.mixture, self.tokenizer, seq,
                                  d["eval_windows"], d["eval_tasks"], self.r["seed"], self.r["train"]["eval_batch_size"])
        return {"step": self.step, "stage": stage.spec["name"], **result}

    # ---- the run -------------------------------------------------------------------------------
    def run(self, resume: bool = True, stop_after_step: int | None = None) -> Path | None:
        """Train every stage, then write the nested checkpoint (rank 0); returns its path.

        ``stop_after_step``: stop after that global step without a final checkpoint, as if killed.
        """
        from tqdm import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        if resume and self.resume():
            if self.main:
                print(f"resumed {self.ckpt_dir} at step {self.step}/{self.total_steps}", flush=True)
        elif self.main and (self.out / "metrics.jsonl").exists():
            (self.out / "metrics.jsonl").unlink()
        tr = self.r["train"]
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (self.main and self.progress),
                   dynamic_ncols=True)
        self.model.train()
        tokens_window, time_window = 0, 0.0
        while self.step < self.total_steps:
            stage = next(s for s in self.stages if s.start <= self.step < s.end)
            elastic = stage.spec["kind"] == "elastic"
            if elastic and self.step == self.elastic_start:
                self._begin_elastic()
            ts = time.time()
            rec = self.train_step(stage)
            dt = time.time() - ts
            if self.step == stage.start + 1:
                self.log_memory(stage)
            self.elapsed += dt
            tokens_window += rec["tokens"]
            time_window += dt
            if self.step % tr["log_every"] == 0 or self.step == stage.end:
                rec["tok_s"] = tokens_window / max(time_window, 1e-9)
                rec["elapsed"] = self.elapsed
                tokens_window, time_window = 0, 0.0
                self.log(rec)
            bar.update(1)
            bar.set_postfix(stage=rec["stage"], loss=f"{rec['loss']:.3f}", budget=rec["budget"] or "parent")
            if self.step == stage.end:
                if self.freeze_step == self.step and not self.fixed and self.step != self.elastic_start:
                    self.freeze_router()
                if self.main or self.fsdp:
                    ev = self.evaluate(stage, elastic)
                if self.main:
                    self.evals.append(ev)
                    self.log({"step": self.step, "event": "eval", **ev})
                    bar.write(format_eval(ev))
                self._barrier()
            if self.step % tr["checkpoint_every"] == 0 or self.step == stage.end:
                self.save()
                self._barrier()
            if stop_after_step is not None and self.step >= stop_after_step:
                bar.close()
                return None
        bar.close()
        path = self.finish()
        self._barrier()
        return path

    def finish(self) -> Path | None:
        model = parallel.gather(self.model) if self.fsdp else self.model  # FSDP2: the full weights on rank 0
        if not self.main:
            return None
        subnets = self.budget_subnets()
        report = {} if self.fixed else self.final_subnets()[1]
        for name, sub in subnets.items():
            validate_subnet(self.cfg, sub, where=f"budgets.{name}")
        if report:
            self.log({"step": self.step, "event": "budgets_final", "budgets": report})
            self._warn_out_of_band(report)
        path = Path(self.r["output"]["path"] or self.out / "nested")
        dtype = {"parent": self.parent_dtype, "float32": torch.float32,
                 "bfloat16": torch.bfloat16}[self.r["output"]["dtype"]]
        training = {"recipe": self.r["name"], "steps": self.step, "evals": self.evals,
                    "stages": self.stage_records(), "tolerance": self.r["router"]["tolerance"],
                    "budget_metric": self.r["router"]["budget_metric"],
                    "depth_ranking": self.space.depth_ranking,
                    "tokens": sum(s.steps * s.spec["batch_size"] * s.spec["seq_len"] for s in self.stages)}
        from elastic_export.nested import save_nested

        save_nested(path, model, subnets, router=self.router, importance=self.importance,
                    tokenizer=self.tokenizer, dtype=dtype,
                    extra={"fractions": dict(zip(self.r["budgets"]["names"], self.r["budgets"]["fractions"])),
                           "training": training})
        return path

    def _warn_out_of_band(self, report: dict) -> None:
        tol = self.r["router"]["tolerance"]
        for name, v in report.items():
            if not v["in_band"] and self.main:
                print(f"warning: budget {name!r} ends at {v['final']:.1%} of the parent, outside {v['target']:.0%} "
                      f"+- {tol:.0%}: no configuration of the router's grid is in the band (finer "
                      "router.width_choices or router.embedding_multiple, or a larger tolerance, would reach it)",
                      flush=True)

    def stage_records(self) -> list[dict]:
        """Per stage: steps, tokens and (elastic) steps per budget, counted from the plan of every step
        (pure functions of seed and step), so reports derive these figures from the run itself."""
        names = self.r["budgets"]["names"]
        out = []
        for st in self.stages:
            s = st.spec
            rec = {"name": s["name"], "kind": s["kind"], "steps": st.steps, "seq_len": s["seq_len"],
                   "batch_size": s["batch_size"], "tokens": st.steps * s["batch_size"] * s["seq_len"],
                   "sampling": s["sampling"] if s["kind"] == "elastic" else None}
            if s["kind"] == "elastic":
                counts = dict.fromkeys(names, 0)
                for step in range(st.start, st.end):
                    saved, self.step = self.step, step
                    try:
                        for b, *_ in self.step_plan(s):
                            counts[names[b]] += 1
                    finally:
                        self.step = saved
                rec["steps_per_budget"] = counts
            out.append(rec)
        return out

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier()


@torch.no_grad()
def evaluate_budgets(model, subnets: dict, mixture, tokenizer, seq_len: int, n_windows: int, n_tasks: int,
                     seed: int = 0, batch_size: int = 64) -> dict:
    """Per budget: parameters, held-out loss (mean CE over fixed held-out windows) and exact-match
    accuracy on short and long tasks (fixed seeds, so every run and stage is scored on the same items)."""
    was_training = model.training
    model.eval()
    split = "held" if any(len(s.held) > seq_len + 1 for s in mixture.sources) else "train"
    windows = mixture.batch(range(10**9, 10**9 + n_windows), seq_len, split).to(model.device)
    tasks = {v: make_tasks(n_tasks, v, seed=10_000 + seed) for v in ("short", "long")}
    out = {}
    for name, sub in subnets.items():
        losses = [float(ce_loss(model(w[None, :-1], subnet=sub), w[None, 1:])) for w in windows]
        entry = {"params": count_params(model.config, sub), "held_out_loss": sum(losses) / max(1, len(losses))}
        for v, ts in tasks.items():
            entry[f"acc_{v}"] = evaluate_tasks(model, tokenizer, ts, sub, batch_size) if ts else None
            entry[f"answer_loss_{v}"] = answer_loss(model, tokenizer, ts, sub, batch_size) if ts else None
        out[name] = entry
    model.train(was_training)
    return {"budgets": out}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def format_eval(ev: dict) -> str:
    def f(v, spec):  # None: not evaluated (data.eval_tasks = 0)
        return "-" if v is None else format(v, spec)

    lines = [f"eval after {ev['stage']} (step {ev['step']}):"]
    for name, e in ev["budgets"].items():
        lines.append(f"  {name:>8}: {e['params']:>10,} params  held-out loss {e['held_out_loss']:.4f}  "
                     f"short {f(e['acc_short'], '.1%')}  long {f(e['acc_long'], '.1%')}  "
                     f"answer loss short {f(e.get('answer_loss_short'), '.3f')} "
                     f"long {f(e.get('answer_loss_long'), '.3f')}")
    return "\n".join(lines)


def train(recipe, out: str | Path | None = None, resume: bool = True, progress: bool | None = None,
          stop_after_step: int | None = None, overrides: dict | None = None) -> Path | None:
    """Run a recipe (a path or a validated dict); returns the nested checkpoint's path (rank 0)."""
    if not isinstance(recipe, dict):
        recipe = load_recipe(recipe, overrides)
    trainer = Trainer(recipe, out, progress)
    try:
        return trainer.run(resume=resume, stop_after_step=stop_after_step)
    finally:
        if trainer.owns_group and dist.is_initialized():
            dist.destroy_process_group()
