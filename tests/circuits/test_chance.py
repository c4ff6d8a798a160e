"""Chance levels of P and J in closed form, against enumeration and Monte Carlo."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dcv.circuits.chance import chance_jaccard, chance_preservation, overlap_pmf


def enumerate_chance(n_heads: int, base_size: int, model_size: int) -> tuple[float, float]:
    """Mean P and J over every head set of size ``model_size`` against base = the first heads."""
    base = set(range(base_size))
    ps, js = [], []
    for chosen in itertools.combinations(range(n_heads), model_size):
        overlap = len(base & set(chosen))
        ps.append(overlap / base_size)
        union = len(base | set(chosen))
        js.append(overlap / union if union else 0.0)
    return float(np.mean(ps)), float(np.mean(js))


def test_four_heads_two_and_two_by_hand():
    # Base {0, 1}; the 6 pairs: {0, 1} (P 1, J 1), four pairs sharing one head (P 1/2, J 1/3), {2, 3} (0, 0).
    assert chance_preservation(4, 2, 2) == pytest.approx((1 + 4 * 0.5) / 6) == 0.5
    assert chance_jaccard(4, 2, 2) == pytest.approx((1 + 4 / 3) / 6)
    assert overlap_pmf(4, 2, 2) == pytest.approx({0: 1 / 6, 1: 4 / 6, 2: 1 / 6})


@pytest.mark.parametrize(("n", "k", "m"), [(6, 3, 2), (7, 2, 5), (8, 5, 5), (5, 1, 5), (6, 4, 0), (9, 9, 3)])
def test_closed_forms_equal_enumeration(n, k, m):
    p, j = enumerate_chance(n, k, m)
    assert chance_preservation(n, k, m) == pytest.approx(p)
    assert chance_jaccard(n, k, m) == pytest.approx(j)
    assert sum(overlap_pmf(n, k, m).values()) == pytest.approx(1.0)


def test_monte_carlo_at_the_seed_papers_density():
    rng = np.random.default_rng(0)
    n, k = 576, 297
    base = np.zeros(n, bool)
    base[:k] = True
    for m in (265, 296):
        overlap = np.array([base[rng.choice(n, m, replace=False)].sum() for _ in range(4000)])
        p, j = overlap / k, overlap / (k + m - overlap)
        # Standard errors about 0.0005 (P) and 0.0004 (J): 5 of them.
        assert chance_preservation(n, k, m) == pytest.approx(p.mean(), abs=0.003)
        assert chance_jaccard(n, k, m) == pytest.approx(j.mean(), abs=0.002)


def test_the_seed_papers_chance_retention():
    # docs/method.md "Chance level": 297 of 576 heads in the base circuit; SFT's 265-head and RL's 296-head
    # circuits.
    assert 100 * chance_preservation(576, 297, 265) == pytest.approx(46.0, abs=0.05)
    assert 100 * chance_preservation(576, 297, 296) == pytest.approx(51.4, abs=0.05)


def test_empty_base_circuit_has_no_chance_level_and_bad_sizes_raise():
    assert chance_preservation(4, 0, 2) is None and chance_jaccard(4, 0, 2) is None
    assert chance_jaccard(4, 2, 0) == 0.0
    with pytest.raises(ValueError, match="n_heads=4, base_size=5"):
        chance_jaccard(4, 5, 1)
    with pytest.raises(ValueError, match="model_size=-1"):
        chance_preservation(4, 2, -1)
