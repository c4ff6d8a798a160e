"""SFT against RL at matched points, these runs (item bootstrap) and across seeds (docs/method.md
"Statistics: what a comparison may claim").

Every number a checkpoint gets from patching is a function of per-item parts, so one function
(``checkpoint_numbers``) computes them all for a choice of probe items and target test items: with all
items it gives the tables' point values, with resampled items one bootstrap draw. Per probe, against the
base model's parts and circuit (``ProbeReference``):

- gaps g(base), g(M); ``lost`` when g(M) < lost_fraction g(base) (then relative numbers are NaN);
- relative effects (divided by g(M)) and absolute effects (divided by g(base)) of the base-circuit heads;
  v_h = sign(e_base) (e_base - e_M) / |e_base| and V = sum |e_base| v_h / sum |e_base|, of each;
- P and J of the base circuit against M's own circuit; on resampled items both are found again (heads
  ranked by |effect| on those items, each circuit keeping its size: for top-k selection exactly the rule);
- forgetting = base - M of accuracy (LD > 0) and of mean LD, from per-item LDs where stored.

Means over probes leave out the target-task probe and probes the base model cannot do; P, J and V also
leave out probes whose base circuit did not reach tau (``ProbeReference.in_means``).

Matched points: on a grid of target accuracy, KL to base and step, each run is interpolated linearly
between its evaluated checkpoints where it first reaches the level (``interpolation_weights``); never at
its step 0 (the base, or an RL run's SFT start), also not inside a draw whose resampled start reaches the
level (that draw leaves the run out; ``Level.start_reached`` is the share of such draws). A level is used
only where at least ``min_runs`` runs of each method reach it.

Two levels of claim (docs/method.md "Statistics: what a comparison may claim"):

- *These runs* (``Level.draws``): conditional on the trained checkpoints, every run kept; the bootstrap
  resamples probe items (one draw per probe, shared by every model: all are patched on the same items) and
  target test items (the accuracy each run is matched on is recomputed, so the matched step moves). Valid
  at any number of runs; it says what these models did.
- *Across seeds* (``across_seeds``): Welch's t on the runs' values at the level, the item part of the
  difference's variance (from the item draws) added to the runs' s^2/n terms, Welch's df of the runs'
  terms. Its false-positive rate under the null is measured by ``bench/null_calibration.py`` at 2, 3
  and 5 runs per method; the minimum detectable effect and the runs per method an effect would need use
  the same t.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from dcv.circuits.competence import is_lost
from dcv.circuits.vulnerability import interpolation_weights, vulnerability
from dcv.metrics import FORGETTING_METRICS, MEAN_METRICS, METRICS

TRAINING_METHODS = ("sft", "rl")
# Per probe: its gap, whether it is lost, its scores, and every mean's own number (a count's flag is
# ``lost``).
PROBE_METRICS = (
    "gap",
    "lost",
    "probe_accuracy",
    "probe_mean_ld",
    *(m for m in MEAN_METRICS if not METRICS[m].counts),
)
# An item-level minimum detectable effect (one model against base over n items, n >> 30, where z is right):
# (z_0.975 + z_0.8) standard errors. Across seeds the t of ``across_seeds`` stands in its place.
MDE_FACTOR = 1.959964 + 0.841621
POWER = 0.8  # the power a minimum detectable effect and the runs an effect would need are stated at
MAX_RUNS_NEEDED = 100  # beyond this many runs per method the answer says "more than 100"


@dataclass(frozen=True)
class ProbeParts:
    """One model on one probe, per item: every item-resampled number is computed from these."""

    delta: np.ndarray  # [heads, items]: LD_clean - LD_patched, every head in (layer, head) order
    denominator: np.ndarray  # [items]: LD_clean - LD_corrupt
    item_ld: np.ndarray | None = None  # [items]: LD_clean; None when the results table has none
    # The gap the lost rule reads where ``denominator`` is a pseudo-item (learned masks: [1] in every model):
    # another method's mean LD_clean - LD_corrupt, or the mean clean LD. None: the denominator's mean.
    gap: float | None = None


@dataclass(frozen=True)
class ProbeReference:
    """What a probe's numbers are measured against: the base model's parts and circuit."""

    name: str
    base: ProbeParts
    circuit: np.ndarray  # head indices (into ProbeParts.delta's rows) of the base circuit
    lost_fraction: float
    in_means: bool  # in means of P, J and V: competent, non-empty circuit that reached tau, prior probe
    in_forgetting: bool  # in means of forgetting and n_lost: the base model does it, prior probe
    base_score: tuple[float, float] = (float("nan"), float("nan"))  # (accuracy, mean LD) from the results


@dataclass(frozen=True)
class Point:
    """One evaluated checkpoint of one run."""

    step: int
    kl: float
    accuracy: float
    correct: np.ndarray | None  # [test items] 1/0; None: accuracy is not resampled
    probes: dict[str, ProbeParts]
    circuit: dict[str, np.ndarray]  # the checkpoint's own circuit per probe (head indices)
    # Per-probe (accuracy, mean LD) from the results table, used where per-item LDs are missing.
    probe_scores: dict[str, tuple[float, float]] = field(default_factory=dict)
    # Numbers with no per-item parts here (benchmarks, base-circuit faithfulness): never resampled.
    fixed: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Run:
    name: str
    method: str
    points: tuple[Point, ...]  # in step order; an RL-after-SFT run's step 0 (its SFT start) is left out


def _top(delta: np.ndarray, items: np.ndarray | None, size: int) -> set[int]:
    """The ``size`` heads with the largest |mean delta| (ties by head order): a circuit's heads, since
    ranking by |effect| does not depend on the (common) gap it is divided by."""
    mean = delta.mean(axis=1) if items is None else delta[:, items].mean(axis=1)
    return set(np.argsort(-np.abs(mean), kind="stable")[:size].tolist())


def _mean(values: np.ndarray, items: np.ndarray | None) -> float:
    return float(values.mean() if items is None else values[items].mean())


def _weighted_v(e_base: np.ndarray, e_model: np.ndarray) -> tuple[np.ndarray, float]:
    v = vulnerability(e_base, e_model)
    weight = np.abs(e_base)
    return v, float((weight * v).sum() / weight.sum())


def probe_numbers(
    parts: ProbeParts,
    ref: ProbeReference,
    circuit: np.ndarray,
    items: np.ndarray | None,
    score: tuple[float, float] | None = None,
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """(PROBE_METRICS, v_h relative, v_h absolute) of one model on one probe, over ``items`` (None: all).

    ``circuit`` is the model's own circuit (on all items); on resampled items its heads are ranked again
    at the same size. ``score`` is the model's (accuracy, mean LD) used where per-item LDs are missing.
    """
    ld_items = items
    if ref.base.delta.shape[1] == 1:
        items = None  # learned masks: one pseudo-item, nothing to resample (the per-item LDs still are)
    g_base = _mean(ref.base.denominator, items)
    g_model = _mean(parts.denominator, items)
    # Masks: the real gaps (not the pseudo-denominator the effects divide by) decide lost, not resampled.
    real = parts.gap is not None and ref.base.gap is not None
    gap_model, gap_base = (parts.gap, ref.base.gap) if real else (g_model, g_base)
    lost = is_lost(gap_model, gap_base, ref.lost_fraction)
    out = {"gap": gap_model, "lost": float(lost)}
    if parts.item_ld is not None and ref.base.item_ld is not None:
        ld_model = parts.item_ld if ld_items is None else parts.item_ld[ld_items]
        ld_base = ref.base.item_ld if ld_items is None else ref.base.item_ld[ld_items]
        out["probe_accuracy"], out["probe_mean_ld"] = float((ld_model > 0).mean()), float(ld_model.mean())
        out["forgetting"] = float((ld_base > 0).mean()) - out["probe_accuracy"]
        out["forgetting_ld"] = float(ld_base.mean()) - out["probe_mean_ld"]
    else:
        # No per-item LDs stored (an older results table): the scores are not item-resampled.
        nan = float("nan")
        out["probe_accuracy"], out["probe_mean_ld"] = score if score is not None else (nan, nan)
        out["forgetting"] = ref.base_score[0] - out["probe_accuracy"]
        out["forgetting_ld"] = ref.base_score[1] - out["probe_mean_ld"]
    n_circuit = len(ref.circuit)
    nan_heads = np.full(n_circuit, np.nan)
    if n_circuit == 0:
        out.update(preservation=np.nan, jaccard=np.nan, circuit_vulnerability=np.nan)
        out["circuit_vulnerability_abs"] = np.nan
        return out, nan_heads, nan_heads
    base_delta = ref.base.delta[ref.circuit]
    model_delta = parts.delta[ref.circuit]
    e_base = _mean_rows(base_delta, items) / g_base
    numerator = _mean_rows(model_delta, items)
    v_abs, out["circuit_vulnerability_abs"] = _weighted_v(e_base, numerator / g_base)
    if lost:
        out.update(preservation=np.nan, jaccard=np.nan, circuit_vulnerability=np.nan)
        return out, nan_heads, v_abs
    v_rel, out["circuit_vulnerability"] = _weighted_v(e_base, numerator / g_model)
    # On resampled items both circuits are found again on those items (at their own sizes), so P and J
    # compare like with like: an unchanged model keeps P = 1 in every draw.
    own = set(circuit.tolist()) if items is None else _top(parts.delta, items, len(circuit))
    base_set = set(ref.circuit.tolist()) if items is None else _top(ref.base.delta, items, n_circuit)
    out["preservation"] = len(base_set & own) / len(base_set)
    out["jaccard"] = len(base_set & own) / len(base_set | own)
    return out, v_rel, v_abs


def _mean_rows(delta: np.ndarray, items: np.ndarray | None) -> np.ndarray:
    return delta.mean(axis=1) if items is None else delta[:, items].mean(axis=1)


@dataclass(frozen=True)
class Layout:
    """Where each number sits in a checkpoint's flat vector (so interpolation is one vector operation)."""

    slices: dict[str, slice]
    size: int

    @classmethod
    def build(cls, refs: Sequence[ProbeReference], fixed: Sequence[str]) -> Layout:
        names: list[tuple[str, int]] = [("target_accuracy", 1), ("kl_to_base", 1)]
        names += [(m, 1) for m in MEAN_METRICS] + [(f, 1) for f in fixed]
        for ref in refs:
            names += [(f"{ref.name}/{m}", 1) for m in PROBE_METRICS]
            names += [(f"{ref.name}/v", len(ref.circuit)), (f"{ref.name}/v_abs", len(ref.circuit))]
        slices, at = {}, 0
        for name, width in names:
            slices[name] = slice(at, at + width)
            at += width
        return cls(slices, at)

    def get(self, vector: np.ndarray, name: str) -> np.ndarray:
        return vector[..., self.slices[name]]

    def scalar(self, vector: np.ndarray, name: str) -> np.ndarray:
        return vector[..., self.slices[name].start]


def checkpoint_numbers(
    point: Point,
    refs: Sequence[ProbeReference],
    layout: Layout,
    probe_items: dict[str, np.ndarray] | None = None,
    target_items: np.ndarray | None = None,
) -> np.ndarray:
    """A checkpoint's flat vector (``layout``) over the chosen items (None: all of them)."""
    probe_items = probe_items or {}
    out = np.full(layout.size, np.nan)
    if point.correct is not None:
        out[layout.slices["target_accuracy"]] = _mean(point.correct, target_items)
    else:
        out[layout.slices["target_accuracy"]] = point.accuracy
    out[layout.slices["kl_to_base"]] = point.kl
    for name, value in point.fixed.items():
        if name in layout.slices:
            out[layout.slices[name]] = value
    in_means: dict[str, list[float]] = {m: [] for m in MEAN_METRICS}
    for ref in refs:
        items = probe_items.get(ref.name)
        numbers, v_rel, v_abs = probe_numbers(
            point.probes[ref.name], ref, point.circuit[ref.name], items, point.probe_scores.get(ref.name)
        )
        for metric in PROBE_METRICS:
            out[layout.slices[f"{ref.name}/{metric}"]] = numbers[metric]
        out[layout.slices[f"{ref.name}/v"]] = v_rel
        out[layout.slices[f"{ref.name}/v_abs"]] = v_abs
        for metric in MEAN_METRICS:
            if ref.in_means or (ref.in_forgetting and metric in FORGETTING_METRICS):
                in_means[metric].append(numbers[METRICS[metric].counts or metric])
    for metric, values in in_means.items():
        finite = [v for v in values if np.isfinite(v)]
        if METRICS[metric].counts:
            out[layout.slices[metric]] = float(sum(values))
        elif finite:
            out[layout.slices[metric]] = float(np.mean(finite))
    return out


def run_at(xs: np.ndarray, numbers: np.ndarray, level: float, from_start: bool = True) -> np.ndarray | None:
    """A run's numbers [points, width] interpolated where its ``xs`` first reach ``level``; None where it
    never does, or where its first point already does and that point is the run's start (``from_start``:
    step 0, the base model or an RL run's SFT start) — the start is not a fine-tuned model."""
    weights = interpolation_weights([float(x) for x in xs], level)
    if weights is None or (from_start and weights[0] == (0, 1.0)):
        return None
    return sum(w * numbers[j] for j, w in weights)


def start_reaches(xs: np.ndarray, level: float, from_start: bool) -> bool:
    """Whether a run's start (its step-0 point) already reaches ``level``: such a run is not matched."""
    return from_start and len(xs) > 0 and float(xs[0]) >= level


def axis_values(layout: Layout, numbers: np.ndarray, steps: np.ndarray, axis: str) -> np.ndarray:
    if axis == "accuracy":
        return layout.scalar(numbers, "target_accuracy")
    if axis == "kl":
        return layout.scalar(numbers, "kl_to_base")
    return steps.astype(np.float64)


@dataclass(frozen=True)
class Level:
    """One matched level: each method's runs at it, their mean vectors, and the item bootstrap's draws of
    SFT, RL and SFT - RL with every run kept (the "these runs" claim)."""

    axis: str
    value: float
    n_runs: dict[str, int]  # runs of each method that reach the level (all items)
    used: bool
    mean: dict[str, np.ndarray]  # method -> [width] (only when used)
    draws: dict[str, np.ndarray]  # method or "sft-rl" -> [B, width] (NaN where no run reached it)
    values: dict[str, np.ndarray] = field(default_factory=dict)  # method -> [runs, width] at the level
    # Share of the draws in which a run's resampled start reached the level (that run left out there).
    start_reached: float = 0.0


def grid(runs: Sequence[Run], base_accuracy: float, accuracy_step: float, kl_levels: int) -> dict[str, list]:
    """{axis: levels}: target accuracy in multiples of ``accuracy_step`` above the base model's (up to the
    best any run reached, so the levels one method never reaches are listed as such), KL evenly spaced up
    to the largest KL *both* methods reach (their KL ranges differ by an order of magnitude: a grid up to
    SFT's would put every level beyond RL), and every evaluated step after 0."""
    accuracies = [p.accuracy for r in runs for p in r.points]
    top = max(accuracies, default=base_accuracy)
    first = int(np.floor(base_accuracy / accuracy_step + 1e-9)) + 1
    last = int(np.floor(top / accuracy_step + 1e-9))
    levels = [round(k * accuracy_step, 10) for k in range(first, last + 1)]
    reach = [
        max((p.kl for r in runs if r.method == m for p in r.points), default=0.0) for m in TRAINING_METHODS
    ]
    kl_top = min(reach)
    kl_grid = [float(x) for x in np.linspace(0, kl_top, kl_levels + 1)[1:]] if kl_top > 0 else []
    steps = sorted({p.step for r in runs for p in r.points if p.step > 0})
    return {"accuracy": levels, "kl": kl_grid, "step": [float(s) for s in steps]}


# One bootstrap draw: the runs chosen per method (indices into ``runs_by_method``; read by the predictors
# table only, the matched comparison keeps every run) and every run's checkpoint vectors [points, width] on
# that draw's probe and target items.
Draw = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]


def runs_by_method(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """The runs of each training method, in ``runs`` order (what a draw's indices point into)."""
    return {m: [r for r in runs if r.method == m] for m in TRAINING_METHODS}


def resample(
    runs: Sequence[Run], refs: Sequence[ProbeReference], layout: Layout, n_bootstrap: int, seed: int = 0
) -> list[Draw]:
    """The bootstrap's draws (docs/method.md "Statistics: what a comparison may claim"): probe items (one draw
    per probe, shared by every model), target test items, then runs within each method (the predictors
    table's; the matched comparison holds the runs fixed). One set serves every level of the matched
    comparison and the predictors table, so their numbers are comparable."""
    by_method = runs_by_method(runs)
    rng = np.random.default_rng(seed)
    # Probe items: as many as the patching parts have, or (masks: one pseudo-item) as the per-item LDs.
    n_items = {
        ref.name: max(ref.base.denominator.shape[0], 0 if ref.base.item_ld is None else len(ref.base.item_ld))
        for ref in refs
    }
    n_test = {r.name: [p.correct.shape[0] for p in r.points if p.correct is not None] for r in runs}
    n_target = max((n for ns in n_test.values() for n in ns), default=0)
    draws = []
    for _ in range(n_bootstrap):
        probe_items = {name: rng.integers(0, n, n) for name, n in n_items.items()}
        target_items = rng.integers(0, n_target, n_target) if n_target else None
        chosen = {m: rng.integers(0, len(rs), len(rs)) for m, rs in by_method.items() if rs}
        # A point shared by several runs (the base at step 0, an SFT start) is computed once per draw.
        cache: dict[int, np.ndarray] = {}
        for r in runs:
            for p in r.points:
                if id(p) not in cache:
                    cache[id(p)] = checkpoint_numbers(p, refs, layout, probe_items, target_items)
        numbers = {r.name: np.stack([cache[id(p)] for p in r.points]) for r in runs}
        draws.append((chosen, numbers))
    return draws


def compare(
    runs: Sequence[Run],
    refs: Sequence[ProbeReference],
    layout: Layout,
    levels: dict[str, list[float]],
    min_runs: int,
    n_bootstrap: int,
    seed: int = 0,
    draws: Sequence[Draw] | None = None,
) -> list[Level]:
    """Every level of ``levels``: which methods reach it and, where both reach it with ``min_runs`` runs,
    the runs' values, their means and the item bootstrap's draws with every run kept (``draws``: from
    ``resample``, made here when None; their run choices are not used here)."""
    by_method = runs_by_method(runs)
    point = {r.name: np.stack([checkpoint_numbers(p, refs, layout) for p in r.points]) for r in runs}
    steps = {r.name: np.array([p.step for p in r.points]) for r in runs}
    from_start = {name: bool(s.size and s[0] == 0) for name, s in steps.items()}
    # One set of draws (items) shared by every level, so levels are comparable.
    draws = resample(runs, refs, layout, n_bootstrap, seed) if draws is None else draws
    n_bootstrap = len(draws)

    def at_level(numbers: np.ndarray, run: Run, axis: str, value: float) -> np.ndarray | None:
        xs = axis_values(layout, numbers, steps[run.name], axis)
        return run_at(xs, numbers, value, from_start[run.name])

    out = []
    for axis, values in levels.items():
        for value in values:
            reached = {
                m: [at for r in rs if (at := at_level(point[r.name], r, axis, value)) is not None]
                for m, rs in by_method.items()
            }
            n_runs = {m: len(reached[m]) for m in TRAINING_METHODS}
            used = all(n >= min_runs for n in n_runs.values())
            if not used:
                out.append(Level(axis, value, n_runs, False, {}, {}))
                continue
            mean = {m: np.mean(reached[m], axis=0) for m in TRAINING_METHODS}
            boot = {m: np.full((n_bootstrap, layout.size), np.nan) for m in TRAINING_METHODS}
            started = 0
            for b, (_, numbers) in enumerate(draws):
                left_out = False
                for m in TRAINING_METHODS:
                    at = []
                    for run in by_method[m]:
                        xs = axis_values(layout, numbers[run.name], steps[run.name], axis)
                        left_out |= start_reaches(xs, value, from_start[run.name])
                        hit = run_at(xs, numbers[run.name], value, from_start[run.name])
                        if hit is not None:
                            at.append(hit)
                    if at:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
                            boot[m][b] = np.nanmean(at, axis=0)
                started += left_out
            boot["sft-rl"] = boot["sft"] - boot["rl"]
            values_at = {m: np.stack(reached[m]) for m in TRAINING_METHODS}
            share = started / n_bootstrap if n_bootstrap else 0.0
            out.append(Level(axis, value, n_runs, True, mean, boot, values_at, share))
    return out


@dataclass(frozen=True)
class SeedTest:
    """The across-seeds comparison of one level, per column of the layout (docs/method.md "Statistics: what a
    comparison may claim")."""

    difference: np.ndarray  # mean over SFT runs - mean over RL runs
    se: np.ndarray  # sqrt(s_sft^2 / n_sft + s_rl^2 / n_rl + item variance of the difference)
    df: np.ndarray  # Satterthwaite's
    p: np.ndarray  # two-sided
    ci_low: np.ndarray
    ci_high: np.ndarray
    mde: np.ndarray  # (t_{1-alpha/2, df} + t_{power, df}) se
    runs_needed: np.ndarray  # runs per method at which the observed difference is the MDE (NaN: > max)


def _satterthwaite(parts: Sequence[np.ndarray], dfs: Sequence[float]) -> np.ndarray:
    total = sum(parts)
    with np.errstate(divide="ignore", invalid="ignore"):
        return total**2 / sum(p**2 / d for p, d in zip(parts, dfs, strict=True))


def _df(part1: np.ndarray, part2: np.ndarray, n1: int, n2: int, df_item: int) -> np.ndarray:
    """Welch's Satterthwaite df of the runs' parts alone: the item part widens the SE but never raises
    the df (a run variance estimated small by chance on 1-2 df must not borrow the items' df); where the
    runs did not vary at all, the item part's own df."""
    df = _satterthwaite([part1, part2], [n1 - 1, n2 - 1])
    return np.where((part1 + part2) > 0, df, df_item)


def _t_factor(df: np.ndarray, alpha: float, power: float) -> np.ndarray:
    return stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)


def across_seeds(
    values: dict[str, np.ndarray], item_draws: np.ndarray, n_items: int, alpha: float, power: float = POWER
) -> SeedTest:
    """Welch's t of SFT against RL on run-level values [runs, width] per method, with the item part of
    the difference's variance (the variance over ``item_draws`` [B, width], every run kept) added to the
    runs' terms; the df is Welch's of the runs' terms alone (``_df``). Under the null its
    false-positive rate is at most ``alpha`` at 2, 3 and 5 runs per method (bench/null_calibration.py).

    ``runs_needed``: the smallest runs per method (equal n, the observed variances) at which the observed
    difference equals the minimum detectable effect at ``power``; NaN when even ``MAX_RUNS_NEEDED`` does
    not reach it (the item part alone may be too large: more items, not more runs)."""
    sft, rl = values["sft"], values["rl"]
    n1, n2 = sft.shape[0], rl.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        var1, var2 = np.var(sft, axis=0, ddof=1), np.var(rl, axis=0, ddof=1)
        finite = np.isfinite(item_draws).sum(axis=0) >= 2
        item = np.where(finite, np.nanvar(item_draws, axis=0, ddof=1), 0.0)
    difference = np.mean(sft, axis=0) - np.mean(rl, axis=0)
    df_item = max(n_items - 1, 1)
    parts = [var1 / n1, var2 / n2, item]
    se = np.sqrt(sum(parts))
    df = _df(var1 / n1, var2 / n2, n1, n2, df_item)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.abs(difference) / se
    p = np.where(se > 0, 2 * stats.t.sf(t, df), np.where(difference == 0, 1.0, 0.0))
    half = stats.t.ppf(1 - alpha / 2, df) * se
    mde = _t_factor(df, alpha, power) * se
    # Every n at once: [n, width] minimum detectable effects at n runs per method (equal n).
    n = np.arange(2, MAX_RUNS_NEEDED + 1)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        mde_n = _t_factor(_df(var1 / n, var2 / n, n, n, df_item), alpha, power) * np.sqrt(
            var1 / n + var2 / n + item
        )
    enough = mde_n <= np.abs(difference)
    todo = np.isfinite(difference) & (np.abs(difference) > 0) & (se > 0) & enough.any(axis=0)
    needed = np.where(todo, n[np.argmax(enough, axis=0), 0], np.nan)
    return SeedTest(difference, se, df, p, difference - half, difference + half, mde, needed)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error at most alpha across the family)."""
    order = np.argsort(p_values, kind="stable")
    m = len(p_values)
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def bonferroni(p_value: float, n_tests: int) -> float:
    """``p_value`` adjusted for ``n_tests`` tests at once: a test at alpha / n_tests each keeps the chance of
    any false positive among them at most alpha (the union bound), whatever their dependence."""
    return min(1.0, n_tests * p_value)


def interval(draws: np.ndarray, ci_level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(low, high, standard error, valid draws) per column of [B, width] draws; NaN draws are left out."""
    alpha = (1 - ci_level) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a column with no finite draw is NaN, as it should
        low = np.nanquantile(draws, alpha, axis=0)
        high = np.nanquantile(draws, 1 - alpha, axis=0)
        se = np.nanstd(draws, axis=0, ddof=1)
    return low, high, se, np.isfinite(draws).sum(axis=0)
