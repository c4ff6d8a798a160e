"""Chance levels of circuit overlap: what a random head set of the same size would score (docs/method.md
"Chance level").

Preservation P(M) = |C(base) ∩ C(M)| / |C(base)| and Jaccard J(M) = |∩| / |∪| grow with the circuits'
sizes alone: at the seed paper's density (297 of 576 heads in the base circuit) a random set of 265 heads
keeps 46% of the base circuit. So every P and J stands beside the value expected of a head set C drawn
uniformly at random among the N heads with |C| = m, against the fixed base circuit of size k. The
overlap X = |C(base) ∩ C| is then hypergeometric, X ~ Hypergeom(N, k, m), with

    pmf(x) = comb(k, x) comb(N - k, m - x) / comb(N, m),   max(0, k + m - N) <= x <= min(k, m)

    E[P] = E[X] / k = m / N
    E[J] = sum_x pmf(x) x / (k + m - x)

Exact integer binomials (``math.comb``), so no scipy and no rounding in the pmf's terms. Pure functions.
"""

from __future__ import annotations

import math


def _check(n_heads: int, base_size: int, model_size: int) -> None:
    if n_heads < 1 or not 0 <= base_size <= n_heads or not 0 <= model_size <= n_heads:
        raise ValueError(
            f"chance: n_heads={n_heads}, base_size={base_size}, model_size={model_size}: need n_heads >= 1 "
            "and both circuit sizes between 0 and n_heads"
        )


def overlap_pmf(n_heads: int, base_size: int, model_size: int) -> dict[int, float]:
    """P(X = x) for the overlap X of a random ``model_size``-head set with a fixed ``base_size``-head
    set among ``n_heads`` heads (hypergeometric), for every x it can take."""
    _check(n_heads, base_size, model_size)
    total = math.comb(n_heads, model_size)
    low, high = max(0, base_size + model_size - n_heads), min(base_size, model_size)
    return {
        x: math.comb(base_size, x) * math.comb(n_heads - base_size, model_size - x) / total
        for x in range(low, high + 1)
    }


def chance_preservation(n_heads: int, base_size: int, model_size: int) -> float | None:
    """E[P] = m / N of a random head set of size ``model_size``; None for an empty base circuit (P is
    not defined there)."""
    _check(n_heads, base_size, model_size)
    return None if base_size == 0 else model_size / n_heads


def chance_jaccard(n_heads: int, base_size: int, model_size: int) -> float | None:
    """E[J] = sum_x pmf(x) x / (k + m - x) of a random head set of size ``model_size``; None for an
    empty base circuit (as for P)."""
    if base_size == 0:
        _check(n_heads, base_size, model_size)
        return None
    pmf = overlap_pmf(n_heads, base_size, model_size)
    return float(sum(p * x / (base_size + model_size - x) for x, p in pmf.items()))
