"""Budget sampling per training step: uniform (stage 1) or weighted (stage 2: 0.5 / 0.3 / 0.2).

The draw is a pure function of (seed, step), so every rank of a distributed run trains the same
budget in a step and a resumed run draws exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import random


class BudgetSampler:
    def __init__(self, n_budgets: int, weights: list[float] | None = None, seed: int = 0):
        if weights is not None and (len(weights) != n_budgets or min(weights) < 0 or sum(weights) <= 0):
            raise ValueError(f"need {n_budgets} non-negative weights with a positive sum, got {weights}")
        self.n = n_budgets
        self.weights = [1.0] * n_budgets if weights is None else [float(w) for w in weights]
        self.seed = seed

    def probabilities(self) -> list[float]:
        s = sum(self.weights)
        return [w / s for w in self.weights]

    def __call__(self, step: int) -> int:
        rng = random.Random(self.seed * 1_000_003 + step)
        return rng.choices(range(self.n), weights=self.weights)[0]
