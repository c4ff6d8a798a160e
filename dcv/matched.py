"""SFT against RL at matched points, with the hierarchical bootstrap (DESIGN "Statistics").

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
between its evaluated checkpoints where it first reaches the level (``interpolation_weights``). A level
is used only where at least ``min_runs`` runs of each method reach it. The bootstrap resamples runs within
each method, probe items (one draw per probe, shared by every model: all are patched on the same items)
and target test items (the accuracy each run is matched on is recomputed, so the matched step moves).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dcv.circuits.competence import is_lost
from dcv.circuits.vulnerability import interpolation_weights, vulnerability

TRAINING_METHODS = ("sft", "rl")
# Means over the probes in means, per checkpoint; the order of the metric vector's first entries.
MEAN_METRICS = (
    "forgetting",
    "forgetting_ld",
    "preservation",
    "jaccard",
    "circuit_vulnerability",
    "circuit_vulnerability_abs",
    "n_lost",
)
FORGETTING_METRICS = ("forgetting", "forgetting_ld", "n_lost")  # over every competent prior probe
# Per probe: its gap, whether it is lost, its scores, and every mean's own number.
PROBE_METRICS = (
    "gap",
    "lost",
    "probe_accuracy",
    "probe_mean_ld",
    *(m for m in MEAN_METRICS if m != "n_lost"),
)
# A minimum detectable effect at 80% power for a two-sided 5% test: (z_0.975 + z_0.8) standard errors.
MDE_FACTOR = 1.959964 + 0.841621


@dataclass(frozen=True)
class ProbeParts:
    """One model on one probe, per item: every item-resampled number is computed from these."""

    delta: np.ndarray  # [heads, items]: LD_clean - LD_patched, every head in (layer, head) order
    denominator: np.ndarray  # [items]: LD_clean - LD_corrupt
    item_ld: np.ndarray | None = None  # [items]: LD_clean; None when the results table has none


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
    lost = is_lost(g_model, g_base, ref.lost_fraction)
    out = {"gap": g_model, "lost": float(lost)}
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
                in_means[metric].append(numbers["lost"] if metric == "n_lost" else numbers[metric])
    for metric, values in in_means.items():
        finite = [v for v in values if np.isfinite(v)]
        if metric == "n_lost":
            out[layout.slices[metric]] = float(sum(values))
        elif finite:
            out[layout.slices[metric]] = float(np.mean(finite))
    return out


def run_at(xs: np.ndarray, numbers: np.ndarray, level: float) -> np.ndarray | None:
    """A run's numbers [points, width] interpolated where its ``xs`` first reach ``level``."""
    weights = interpolation_weights([float(x) for x in xs], level)
    if weights is None:
        return None
    return sum(w * numbers[j] for j, w in weights)


def axis_values(layout: Layout, numbers: np.ndarray, steps: np.ndarray, axis: str) -> np.ndarray:
    if axis == "accuracy":
        return layout.scalar(numbers, "target_accuracy")
    if axis == "kl":
        return layout.scalar(numbers, "kl_to_base")
    return steps.astype(np.float64)


@dataclass(frozen=True)
class Level:
    """One matched level: each method's mean vector and the bootstrap draws of SFT, RL and SFT - RL."""

    axis: str
    value: float
    n_runs: dict[str, int]  # runs of each method that reach the level (all items)
    used: bool
    mean: dict[str, np.ndarray]  # method -> [width] (only when used)
    draws: dict[str, np.ndarray]  # method or "sft-rl" -> [B, width] (NaN where no run reached it)


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


# One hierarchical bootstrap draw: the runs chosen per method (indices into ``runs_by_method``) and every
# run's checkpoint vectors [points, width] on that draw's probe and target items.
Draw = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]


def runs_by_method(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """The runs of each training method, in ``runs`` order (what a draw's indices point into)."""
    return {m: [r for r in runs if r.method == m] for m in TRAINING_METHODS}


def resample(
    runs: Sequence[Run], refs: Sequence[ProbeReference], layout: Layout, n_bootstrap: int, seed: int = 0
) -> list[Draw]:
    """The hierarchical bootstrap's draws (DESIGN "Statistics"): probe items (one draw per probe, shared
    by every model), target test items, then runs within each method. One set serves every level of the
    matched comparison and the predictors table, so their numbers are comparable."""
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
        numbers = {
            r.name: np.stack(
                [checkpoint_numbers(p, refs, layout, probe_items, target_items) for p in r.points]
            )
            for r in runs
        }
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
    the point means and the hierarchical bootstrap draws (``draws``: from ``resample``, made here when
    None)."""
    by_method = runs_by_method(runs)
    point = {r.name: np.stack([checkpoint_numbers(p, refs, layout) for p in r.points]) for r in runs}
    steps = {r.name: np.array([p.step for p in r.points]) for r in runs}
    # One set of draws (items, then runs) shared by every level, so levels are comparable.
    draws = resample(runs, refs, layout, n_bootstrap, seed) if draws is None else draws
    n_bootstrap = len(draws)
    out = []
    for axis, values in levels.items():
        for value in values:
            reached = {
                m: [
                    at
                    for r in rs
                    if (
                        at := run_at(
                            axis_values(layout, point[r.name], steps[r.name], axis), point[r.name], value
                        )
                    )
                    is not None
                ]
                for m, rs in by_method.items()
            }
            n_runs = {m: len(reached[m]) for m in TRAINING_METHODS}
            used = all(n >= min_runs for n in n_runs.values())
            if not used:
                out.append(Level(axis, value, n_runs, False, {}, {}))
                continue
            mean = {m: np.mean(reached[m], axis=0) for m in TRAINING_METHODS}
            boot = {m: np.full((n_bootstrap, layout.size), np.nan) for m in TRAINING_METHODS}
            for b, (chosen, numbers) in enumerate(draws):
                for m in TRAINING_METHODS:
                    at = []
                    for i in chosen[m]:
                        run = by_method[m][i]
                        xs = axis_values(layout, numbers[run.name], steps[run.name], axis)
                        hit = run_at(xs, numbers[run.name], value)
                        if hit is not None:
                            at.append(hit)
                    if at:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
                            boot[m][b] = np.nanmean(at, axis=0)
            boot["sft-rl"] = boot["sft"] - boot["rl"]
            out.append(Level(axis, value, n_runs, True, mean, boot))
    return out


def interval(draws: np.ndarray, ci_level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(low, high, standard error, valid draws) per column of [B, width] draws; NaN draws are left out."""
    alpha = (1 - ci_level) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a column with no finite draw is NaN, as it should
        low = np.nanquantile(draws, alpha, axis=0)
        high = np.nanquantile(draws, 1 - alpha, axis=0)
        se = np.nanstd(draws, axis=0, ddof=1)
    return low, high, se, np.isfinite(draws).sum(axis=0)
