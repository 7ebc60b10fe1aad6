from collections import Counter

from training.sampler import BudgetSampler


def test_weighted_frequencies_match_weights():
    s = BudgetSampler(3, [0.5, 0.3, 0.2], seed=1)
    c = Counter(s(step) for step in range(20000))
    for i, w in enumerate([0.5, 0.3, 0.2]):
        assert abs(c[i] / 20000 - w) < 0.015


def test_uniform_and_deterministic_per_step():
    s = BudgetSampler(3, seed=2)
    c = Counter(s(step) for step in range(15000))
    assert all(abs(c[i] / 15000 - 1 / 3) < 0.015 for i in range(3))
    assert [s(k) for k in range(50)] == [BudgetSampler(3, seed=2)(k) for k in range(50)]
