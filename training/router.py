"""The router (Nemotron Elastic, Eqs. 6-12): one small MLP per elastic axis, Gumbel-Softmax choices.

Each axis router maps a one-hot of the target budget to logits over that axis's choices
([rows, choices]; one row per layer when heterogeneous): Linear (no bias) -> LeakyReLU -> Linear,
hidden 256. Training samples hard choices with Gumbel-Softmax (temperature annealed 1.0 -> 0.05,
logits scaled 1 -> 10, both linear in training progress; the paper does not give the curve's
shape) and passes a straight-through one-hot (value 1 forward, soft-probability gradient) to the
model through :meth:`ElasticSpace.gates` and to the budget loss through the differentiable cost.
Inference takes the argmax with weight 1, repaired into the budget's tolerance band by importance
(:meth:`ElasticSpace.repair`) when the router ends outside it.

The full budget (fraction 1.0) is not routed: it is the parent itself. The paper's budget loss
pushes the full budget's router to the largest choices; fixing it there is the same end point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from elastic_export.elastic import Subnet

from .space import ElasticSpace


def gumbel_schedule(progress: float, tau=(1.0, 0.05), scale=(1.0, 10.0)) -> tuple[float, float]:
    """(temperature, logit scale) at ``progress`` in [0, 1] of the elastic training (linear)."""
    p = min(max(progress, 0.0), 1.0)
    return tau[0] + (tau[1] - tau[0]) * p, scale[0] + (scale[1] - scale[0]) * p


def gumbel_softmax_st(logits: torch.Tensor, tau: float, generator: torch.Generator | None = None):
    """Hard Gumbel-Softmax over the last axis with a straight-through gradient.

    Returns (y [..., C]: one-hot in value, softmax gradient; index [...]). ``generator`` makes the
    noise reproducible (the trainer seeds it per step, so every rank and resume draws the same).
    """
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float32).to(logits.device)
    g = -torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-10)))
    soft = F.softmax((logits.float() + g) / tau, dim=-1)
    index = soft.argmax(-1)
    hard = F.one_hot(index, soft.shape[-1]).to(soft.dtype)
    return hard - soft.detach() + soft, index


class AxisRouter(nn.Module):
    def __init__(self, n_budgets: int, rows: int, choices: int, hidden: int = 256, valid=None):
        super().__init__()
        self.rows, self.choices = rows, choices
        self.net = nn.Sequential(nn.Linear(n_budgets, hidden, bias=False), nn.LeakyReLU(),
                                 nn.Linear(hidden, rows * choices))
        # choices that repeat a width of their row (after rounding) are never picked
        mask = torch.ones(rows, choices, dtype=torch.bool) if valid is None else torch.tensor(valid)
        self.register_buffer("valid", mask, persistent=False)

    def forward(self, onehot: torch.Tensor) -> torch.Tensor:
        logits = self.net(onehot).view(self.rows, self.choices)  # [rows, choices]
        return logits.masked_fill(~self.valid, float("-inf"))


class Router(nn.Module):
    """One :class:`AxisRouter` per axis of ``space``; budgets are indexed 0..n_budgets-1."""

    def __init__(self, space: ElasticSpace, n_budgets: int, hidden: int = 256):
        super().__init__()
        self.space = space
        self.n_budgets = n_budgets
        self.axes = nn.ModuleDict({name: AxisRouter(n_budgets, ax.rows, ax.choices, hidden, ax.valid)
                                   for name, ax in space.axes.items()})

    def logits(self, budget: int) -> dict[str, torch.Tensor]:
        onehot = F.one_hot(torch.tensor(budget), self.n_budgets).float().to(self._device())
        return {name: r(onehot) for name, r in self.axes.items()}

    def _device(self):
        return next(self.parameters()).device

    def sample(self, budget: int, tau: float, scale: float, generator: torch.Generator | None = None):
        """Hard Gumbel-Softmax choices: (y per axis [rows, C] straight-through, index per axis [rows])."""
        y, index = {}, {}
        for name, logit in self.logits(budget).items():
            y[name], index[name] = gumbel_softmax_st(logit * scale, tau, generator)
        return y, index

    def probabilities(self, budget: int) -> dict[str, torch.Tensor]:
        """The router's own distribution per axis (softmax of its logits, no noise, no schedule) [rows, C]."""
        return {name: F.softmax(logit.float(), dim=-1) for name, logit in self.logits(budget).items()}

    @torch.no_grad()
    def argmax(self, budget: int) -> dict[str, torch.Tensor]:
        return {name: logit.argmax(-1) for name, logit in self.logits(budget).items()}

    def subnet(self, budget: int) -> Subnet:
        """The router's raw configuration of a budget: the argmax choice on every axis (before any repair)."""
        return self.space.subnet(self.argmax(budget))


def budget_loss(cost: torch.Tensor, target: float, tolerance: float = 0.05) -> torch.Tensor:
    """|C / C_target - 1|, zero within ``tolerance`` (Eq. 12 in the public implementation's form).

    The trainer applies it to the expected cost under :meth:`Router.probabilities` by default
    (``router.budget_cost = "expected"``), or to the sampled straight-through cost (``"sampled"``,
    the paper's form, whose gradient vanishes as the temperature falls and the logit scale grows).
    """
    rel = (cost / target - 1).abs()
    return torch.where(rel > tolerance, rel, torch.zeros_like(rel))
