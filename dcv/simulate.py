"""Synthetic experiments with known truth, for proving the matched comparison's error rates by simulation.

``experiment`` draws one SFT-vs-RL experiment as ``dcv.matched`` objects (runs of checkpoints with
per-item patching parts), so the comparison under test is dcv's own (``compare``, ``across_seeds``), not
a copy. The model of a checkpoint (run r, step s) on one probe with heads h and items i:

- base: e_h is the head's effect (the first ``circuit_size`` heads carry it), the gap per item
  g_i = 1 + 0.3 z, delta_{h,i} = e_h g_i + sigma_item z, clean LD_i = 3 g_i;
- damage d_{r,s} = effect[method] s / last + sigma_run b_r + sigma_step z_{r,s} (b_r: the run's own
  drift, shared by its checkpoints); a circuit head keeps (1 - d) of its effect, every LD (1 - d / 2) of
  its size, so V (absolute) is about d and forgetting about d / 2 of the base LD;
- every model's parts carry fresh item noise sigma_item (the run x item part); all models are patched on
  the same items (the item part itself, g_i, is shared, as in a real experiment);
- target accuracy: each test item answered correctly with probability base + gain s / last + run noise,
  KL = 0.3 s (1 + 0.2 z).

Under ``effect = {"sft": x, "rl": x}`` (a true null) SFT and RL runs come from one distribution.
``VarianceComponents.from_run`` reads a finished run's between-run and item-level spread (V absolute).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dcv.matched import Layout, Point, ProbeParts, ProbeReference, Run

STEPS = (0, 4, 8)


@dataclass(frozen=True)
class VarianceComponents:
    sigma_run: float = 0.08  # between runs of one method: SD of a run's damage
    sigma_step: float = 0.03  # a checkpoint's own deviation from its run's drift
    sigma_item: float = 0.3  # per item and head: the run x item part of the patching parts
    n_items: int = 32
    n_test: int = 32
    n_heads: int = 12
    circuit_size: int = 3

    @classmethod
    def from_run(cls, run_dir: Path) -> VarianceComponents:
        """Between-run SD of V (absolute) at the last evaluated step (pooled within methods) and its item
        bootstrap SE per model (the headline's SE of one method at the last matched step, times sqrt of
        its runs), from a finished run's analysis tables; item counts from the same tables."""
        import polars as pl

        checkpoints = pl.read_parquet(run_dir / "analysis" / "summary.parquet")
        headline = pl.read_parquet(run_dir / "analysis" / "headline.parquet")
        last = checkpoints.filter(pl.col("step") == checkpoints["step"].max())
        spread = [
            float(np.nanvar(f["circuit_vulnerability_abs"].cast(pl.Float64).to_numpy(), ddof=1))
            for _, f in last.group_by("training")
            if f.height >= 2
        ]
        sigma_run = float(np.sqrt(np.mean(spread))) if spread else cls.sigma_run
        step_rows = headline.filter(
            (pl.col("matched_by") == "step")
            & (pl.col("metric") == "circuit_vulnerability_abs")
            & (pl.col("training") == "sft")
            & pl.col("se").is_not_null()
        ).sort("matched_at")
        defaults = cls()
        if step_rows.is_empty():
            return cls(sigma_run=sigma_run)
        row = step_rows.row(-1, named=True)
        per_model_se = float(row["se"]) * np.sqrt(row["n_runs_sft"])
        n_items = int(row["n_probe_items"])
        # The simulator's per-model item SE of V (absolute) is linear in sigma_item: scale the default's.
        sigma_item = defaults.sigma_item * per_model_se / item_se(defaults)
        return cls(sigma_run=sigma_run, sigma_item=sigma_item, n_items=n_items)


def item_se(components: VarianceComponents, n_models: int = 200, seed: int = 1) -> float:
    """The item bootstrap SE of one model's V (absolute) under these components, estimated by simulating
    ``n_models`` undamaged models' V on fresh items (the SD over models is the item part alone)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_models):
        base, ref = _base(components, rng)
        parts = _model(components, base, 0.0, rng)
        values.append(_v_abs(parts, ref))
    return float(np.std(values, ddof=1))


def _v_abs(parts: ProbeParts, ref: ProbeReference) -> float:
    from dcv.matched import probe_numbers

    return probe_numbers(parts, ref, ref.circuit, None)[0]["circuit_vulnerability_abs"]


@dataclass(frozen=True)
class _Base:
    effect: np.ndarray  # [heads]
    gap: np.ndarray  # [items]
    parts: ProbeParts


def _base(c: VarianceComponents, rng: np.random.Generator) -> tuple[_Base, ProbeReference]:
    effect = np.zeros(c.n_heads)
    effect[: c.circuit_size] = np.linspace(1.0, 0.5, c.circuit_size)
    effect[c.circuit_size :] = 0.02
    gap = 1 + 0.3 * rng.standard_normal(c.n_items)
    delta = effect[:, None] * gap[None, :] + c.sigma_item * rng.standard_normal((c.n_heads, c.n_items))
    parts = ProbeParts(delta, gap, item_ld=3 * gap)
    circuit = np.arange(c.circuit_size)
    ref = ProbeReference("probe", parts, circuit, 0.25, in_means=True, in_forgetting=True)
    return _Base(effect, gap, parts), ref


def _model(c: VarianceComponents, base: _Base, damage: float, rng: np.random.Generator) -> ProbeParts:
    keep = np.ones(c.n_heads)
    keep[: c.circuit_size] = 1 - damage
    noise = c.sigma_item * rng.standard_normal((c.n_heads, c.n_items))
    delta = (base.effect * keep)[:, None] * base.gap[None, :] + noise
    ld = 3 * base.gap * (1 - damage / 2) + c.sigma_item * rng.standard_normal(c.n_items)
    return ProbeParts(delta, base.gap, item_ld=ld)


@dataclass(frozen=True)
class Experiment:
    runs: list[Run]
    refs: list[ProbeReference]
    layout: Layout
    truth: dict[str, float]  # "these runs" truth of SFT - RL at the last step: mean damage per method


def experiment(
    n_runs: int,
    components: VarianceComponents,
    rng: np.random.Generator,
    effect: dict[str, float] | None = None,
    base_accuracy: float = 0.25,
    gain: float = 0.3,
) -> Experiment:
    """One synthetic experiment: ``n_runs`` runs per method evaluated at ``STEPS`` (step 0 is the base)."""
    effect = effect or {"sft": 0.3, "rl": 0.3}
    c = components
    base, ref = _base(c, rng)
    base_correct = (rng.random(c.n_test) < base_accuracy).astype(np.float64)
    start = Point(
        0, 0.0, float(base_correct.mean()), base_correct, {"probe": base.parts}, {"probe": ref.circuit}
    )
    last = STEPS[-1]
    runs, truth = [], {}
    for method in ("sft", "rl"):
        damages = []
        for r in range(n_runs):
            drift = c.sigma_run * rng.standard_normal()
            skill = 0.05 * rng.standard_normal()
            points = [start]
            for step in STEPS[1:]:
                d = effect[method] * step / last + drift + c.sigma_step * rng.standard_normal()
                if step == last:
                    damages.append(d)
                parts = _model(c, base, d, rng)
                p_correct = np.clip(base_accuracy + (gain + skill) * step / last, 0, 1)
                correct = (rng.random(c.n_test) < p_correct).astype(np.float64)
                kl = 0.3 * step * (1 + 0.2 * rng.standard_normal())
                own = np.argsort(-np.abs(parts.delta.mean(axis=1)), kind="stable")[: c.circuit_size]
                points.append(
                    Point(step, kl, float(correct.mean()), correct, {"probe": parts}, {"probe": own})
                )
            runs.append(Run(f"{method}-{r}", method, tuple(points)))
        truth[method] = float(np.mean(damages))
    layout = Layout.build([ref], ())
    return Experiment(runs, [ref], layout, {"sft-rl": truth["sft"] - truth["rl"]})


@dataclass
class Tally:
    """Counts over simulated experiments of one setting and axis."""

    experiments: int = 0  # experiments with a used level on the axis
    seeds_rejected: int = 0  # the across-seeds test's p < alpha (a false positive under the null)
    seeds_covered: int = 0  # its CI holds the true across-seeds difference
    runs_rejected: int = 0  # the these-runs CI excludes 0
    runs_covered: int = 0  # the these-runs CI holds these runs' own truth (their mean damage difference)
    v2_rejected: int = 0  # version 2's CI (bootstrap over runs, then items) excludes 0
    start_reached: float = 0.0  # summed share of draws in which a run's start reached the level


METRIC = "circuit_vulnerability_abs"


def v2_interval(level, layout: Layout, runs: list[Run], draws, ci_level: float) -> tuple[float, float]:
    """Version 2's percentile CI of SFT - RL (before 2026-12-07): each draw's runs chosen with replacement
    within each method, their values on that draw's items averaged. Kept only to show what v3 replaced."""
    from dcv.matched import axis_values, interval, run_at, runs_by_method

    by_method = runs_by_method(runs)
    at = layout.slices[METRIC].start
    diffs = np.full((len(draws), 1), np.nan)
    for b, (chosen, numbers) in enumerate(draws):
        means = []
        for m in ("sft", "rl"):
            hits = []
            for i in chosen[m]:
                run = by_method[m][i]
                steps = np.array([p.step for p in run.points])
                xs = axis_values(layout, numbers[run.name], steps, level.axis)
                hit = run_at(xs, numbers[run.name], level.value, from_start=False)
                if hit is not None:
                    hits.append(hit[at])
            means.append(np.mean(hits) if hits else np.nan)
        diffs[b, 0] = means[0] - means[1]
    low, high, _, _ = interval(diffs, ci_level)
    return float(low[0]), float(high[0])


def null_rates(
    n_runs: int,
    n_experiments: int,
    components: VarianceComponents,
    n_bootstrap: int = 100,
    alpha: float = 0.05,
    seed: int = 0,
    effect: dict[str, float] | None = None,
    axes: tuple[str, ...] = ("step", "accuracy"),
) -> dict[str, Tally]:
    """Per axis, how often each procedure rejects and covers over ``n_experiments`` simulated experiments
    (a true null unless ``effect`` differs by method). On each axis the level read is the one the report
    states: the highest level both methods reach with at least 2 runs."""
    from dcv.matched import across_seeds, compare, grid, interval, resample

    rng = np.random.default_rng(seed)
    tallies = {axis: Tally() for axis in axes}
    for e in range(n_experiments):
        ex = experiment(n_runs, components, rng, effect)
        at = ex.layout.slices[METRIC].start
        base_accuracy = ex.runs[0].points[0].accuracy
        levels = grid(ex.runs, base_accuracy, 0.05, 6)
        draws = resample(ex.runs, ex.refs, ex.layout, n_bootstrap, seed=seed * 100_003 + e)
        compared = compare(
            ex.runs, ex.refs, ex.layout, {a: levels[a] for a in axes}, 2, n_bootstrap, draws=draws
        )
        truth = effect or {"sft": 0, "rl": 0}
        population = truth.get("sft", 0) - truth.get("rl", 0)
        for axis in axes:
            used = [lv for lv in compared if lv.axis == axis and lv.used]
            if not used:
                continue
            level = max(used, key=lambda lv: lv.value)
            tally = tallies[axis]
            tally.experiments += 1
            tally.start_reached += level.start_reached
            test = across_seeds(level.values, level.draws["sft-rl"], components.n_items, alpha)
            tally.seeds_rejected += bool(test.p[at] < alpha)
            tally.seeds_covered += bool(test.ci_low[at] <= population <= test.ci_high[at])
            low, high, _, _ = interval(level.draws["sft-rl"], 1 - alpha)
            tally.runs_rejected += bool(low[at] > 0 or high[at] < 0)
            if axis == "step":  # these runs' truth is known at the last step only
                tally.runs_covered += bool(low[at] <= ex.truth["sft-rl"] <= high[at])
            v2_low, v2_high = v2_interval(level, ex.layout, ex.runs, draws, 1 - alpha)
            tally.v2_rejected += bool(v2_low > 0 or v2_high < 0)
    return tallies


def upper_bound(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound of a rate seen k times in n."""
    from scipy import stats

    return 1.0 if k >= n else float(stats.beta.ppf(confidence, k + 1, n - k))


def lower_bound(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson lower bound of a rate seen k times in n."""
    from scipy import stats

    return 0.0 if k == 0 else float(stats.beta.ppf(1 - confidence, k, n - k + 1))
