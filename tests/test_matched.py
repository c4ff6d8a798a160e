"""The matched comparison's hierarchical bootstrap on synthetic runs with known noise."""

from __future__ import annotations

import numpy as np
import pytest

from dcv.matched import Layout, Point, ProbeParts, ProbeReference, Run, compare, interval


def runs_with_items(n_items: int, seed: int = 0) -> tuple[list[Run], list[ProbeReference], Layout]:
    """Two runs per method, each with one checkpoint at step 2; SFT keeps 0.6 of the circuit head's
    effect, RL 0.9 (V 0.4 vs 0.1), with per-item noise of sd 0.5 on every model's parts."""
    rng = np.random.default_rng(seed)

    def parts(scale: float) -> ProbeParts:
        delta = np.vstack([scale * (1 + rng.normal(0, 0.5, n_items)), np.zeros(n_items)])
        return ProbeParts(delta, np.ones(n_items))

    base = parts(1.0)
    ref = ProbeReference("ioi", base, np.array([0]), 0.25, True, True)
    layout = Layout.build([ref], ())

    def point(step: int, probe: ProbeParts) -> Point:
        return Point(step, 0.1 * step, 0.25 + 0.1 * step, None, {"ioi": probe}, {"ioi": np.array([0])})

    runs = [
        Run(f"{method}-{i}", method, (point(0, base), point(2, parts(scale))))
        for method, scale in (("sft", 0.6), ("rl", 0.9))
        for i in range(2)
    ]
    return runs, [ref], layout


def width(n_items: int) -> float:
    runs, refs, layout = runs_with_items(n_items)
    (level,) = compare(runs, refs, layout, {"step": [2.0]}, 2, 400)
    low, high, _, _ = interval(level.draws["sft-rl"], 0.95)
    at = layout.slices["circuit_vulnerability_abs"].start
    assert level.used and level.n_runs == {"sft": 2, "rl": 2}
    return float(high[at] - low[at])


def test_ci_width_shrinks_as_one_over_sqrt_items():
    """Quadrupling the probe items halves the CI of the SFT - RL difference in V (within bootstrap noise)."""
    ratio = width(64) / width(256)
    assert ratio == pytest.approx(2.0, rel=0.25)


def test_a_level_one_method_reaches_with_one_run_is_not_used():
    runs, refs, layout = runs_with_items(16)
    (level,) = compare(runs[:3], refs, layout, {"step": [2.0]}, 2, 50)
    assert not level.used and level.n_runs == {"sft": 2, "rl": 1} and not level.draws
