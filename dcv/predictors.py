"""What predicts forgetting, and weight change against function change (docs/method.md "What predicts
forgetting").

RL's Razor (Shenfeld et al. 2025) fits forgetting against the forward KL to the base on the new task
(R^2 about 0.7 for LLMs) and rules out weight change. dcv puts every candidate in one table per patching
method (``predictor_table``): each predictor of ``PREDICTORS`` against each forgetting measure of
``TARGETS`` over the fine-tuned checkpoints (step > 0; an RL-after-SFT run's start point is its SFT run's),
in the groups of ``GROUPS``, in this order:

- within each training method (sft, rl): forgetting = a + b x;
- pooled with a method fixed effect (``FIXED_EFFECT``): forgetting = a_method + b x, beside the R^2 of the
  method intercepts alone (``r2_method_only``), so a predictor that only separates the methods adds
  nothing to it (measured 2026-12-07: KL's R^2 is 0.07 within RL, 0.86 within SFT, 0.87 pooled);
- pooled without it ("pooled"), RL's Razor's fit.

Each row has R^2 (1 - SSE/SST, SST about the grand mean), the slope b, Spearman's rho (with the method
effect: of the method-demeaned values), the leave-one-run-out R^2 (``r2_loro``: fit on every run but one,
predict its checkpoints; 1 - SSE/SST of the pooled out-of-sample predictions, negative when they do worse
than the mean) and n (checkpoints, runs). ``steps`` (the checkpoint's training step) is a baseline in every
group: a predictor no better than how long the run trained is seen as such.

A predictor read from the same probe items as the forgetting it predicts is no predictor: under a uniform
shrink of every LD, V (absolute) and forgetting (mean LD) are one number up to scale (R^2 = 1). So the
circuit predictors (``Predictor.items``: V, V abs, 1 - P, 1 - J, CMAP) meet the item-based forgetting
measures (``ITEM_TARGETS``) only on disjoint items: with ``analysis.predictor_item_split`` the predictor is
computed on each probe's even-indexed items and forgetting on its odd-indexed ones
(``dcv.matched.checkpoint_numbers`` on each half; P and J rank both circuits again on the half). Where that
cannot be done (the split off; learned masks or a results table without per-item LDs; CMAP, stored per
checkpoint over all items) the row's status is "same items" and it has no numbers. KL, weight change and
steps are not read from probe items: they meet forgetting on all items.

CIs come from the analysis' bootstrap draws (``dcv.matched.resample``: the runs each draw chose within each
method, its probe and target items; the draws of the matched comparison). Split rows take each draw's runs
and resample the items within each half (``SPLIT_SEED``). Against the best predictor of its (forgetting,
training) group a row has the R^2 gap in the same draws, its CI and ``versus_best``: "best", "below best"
(the gap's CI excludes 0) or "not distinguishable at this power"; with fewer than ``MIN_VERDICT_RUNS`` runs
of a method in the group there is no verdict ("not distinguishable at this power (2 runs)"): the run
bootstrap under-covers at two runs.

Each predictor is one entry of a checkpoint's number vector (``dcv.matched.Layout``; ``steps`` the points'
``step``): a ``dcv.metrics.PREDICTORS`` record (``analysis.predictors`` names them). CMAP
(``dcv.analysis.inputs.mean_cmap``: the mean |cmap_h|, direction ckpt_into_base, over base-circuit heads,
averaged over the probes in the means), KL and weight change are fixed per checkpoint and move only with
the runs.

``weight_function_table``: per checkpoint and probe, Spearman of each base-circuit head's weight change
(``dcv.circuits.weight_change``) with its v_h (relative and absolute), and per method over all its
checkpoints' (head, checkpoint) pairs: is a head whose weights moved also the head whose function broke?
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import polars as pl

from dcv.matched import (
    TRAINING_METHODS,
    Draw,
    Layout,
    ProbeReference,
    Run,
    checkpoint_numbers,
    interval,
    runs_by_method,
)
from dcv.metrics import MEAN_METRICS, PREDICTORS

FIXED_EFFECT = "pooled (method effect)"
# The fits, in the table's and the report's order: within each method first, then pooled with a method
# fixed effect, then pooled without it (RL's Razor's fit).
GROUPS = {"sft": ("sft",), "rl": ("rl",), FIXED_EFFECT: TRAINING_METHODS, "pooled": TRAINING_METHODS}
# RL's Razor's figure for LLMs: R^2 of forgetting against forward KL on the new task (docs/method.md).
RAZOR_R2 = 0.7
# versus_best needs this many runs of each method in the group: below it the run bootstrap under-covers
# (with two runs a method's resamples take two values).
MIN_VERDICT_RUNS = 3
NOT_DISTINGUISHABLE = "not distinguishable at this power"
SPLIT_SEED = 1  # the item draws within each half behind split rows' CIs


TARGETS = {
    "forgetting": "forgetting (probe accuracy)",
    "forgetting_ld": "forgetting (mean LD)",
    "forgetting_bench": "forgetting (benchmarks)",
}
ITEM_TARGETS = ("forgetting", "forgetting_ld")  # read from the probe items' LDs
PREDICTORS_SCHEMA = {
    "patching": pl.String,
    "predictor": pl.String,
    "forgetting": pl.String,  # which forgetting measure (TARGETS)
    "training": pl.String,  # sft | rl | pooled (method effect) | pooled (GROUPS)
    # ok | not measured (the predictor has no value) | same items (a circuit predictor against item-based
    # forgetting without disjoint items: no numbers, see note) | too few checkpoints (< 3 with both numbers)
    # | no variation (the predictor or forgetting is constant over the checkpoints, within methods for the
    # method-effect fit)
    "status": pl.String,
    # all: both numbers on every item (or the predictor is not read from probe items); split: the
    # predictor on each probe's even-indexed items, forgetting on its odd-indexed ones; null: same items
    "items": pl.String,
    "r2": pl.Float64,  # of forgetting = a + b x (method effect: a_method + b x), 1 - SSE/SST
    "r2_ci_low": pl.Float64,
    "r2_ci_high": pl.Float64,
    "r2_method_only": pl.Float64,  # method-effect rows: R^2 of forgetting = a_method alone (the floor)
    "r2_loro": pl.Float64,  # leave-one-run-out R^2 of the same model (can be negative); no CI
    "slope": pl.Float64,  # b (method effect: the common within-method slope)
    "spearman": pl.Float64,  # method effect: of the method-demeaned values
    "spearman_ci_low": pl.Float64,
    "spearman_ci_high": pl.Float64,
    "r2_below_best": pl.Float64,  # R^2 of the group's best predictor minus this one's
    "below_best_ci_low": pl.Float64,
    "below_best_ci_high": pl.Float64,
    # best | below best | not distinguishable at this power [(n runs): too few runs for a verdict]
    "versus_best": pl.String,
    "n_checkpoints": pl.Int64,
    "n_runs": pl.Int64,
    "n_resamples": pl.Int64,  # bootstrap draws with at least 3 checkpoints with both numbers
    "note": pl.String,  # not measured: what measures it; same items: why the items are not disjoint
}


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rho over the finite pairs (average ranks); None with fewer than 3 or a constant side."""
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return _pearson(_ranks(x), _ranks(y))


# Plain numpy (no polars ranks, no np.corrcoef): the bootstrap fits every predictor thousands of times.
def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    dx, dy = x - x.mean(), y - y.mean()
    return float((dx * dy).sum() / np.sqrt((dx * dx).sum() * (dy * dy).sum()))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks: ties share the mean of their ranks."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2)[inverse]


def _group_means(v: np.ndarray, codes: np.ndarray, k: int) -> np.ndarray:
    """[k] mean of ``v`` per code 0..k-1 (0 where a code has no value)."""
    return np.bincount(codes, v, k) / np.maximum(np.bincount(codes, minlength=k), 1)


def _varies(v: np.ndarray, codes: np.ndarray) -> bool:
    """Whether ``v`` varies within at least one code."""
    if not codes.any():
        return bool(np.ptp(v) > 0) if len(v) else False
    return any(np.ptp(part) > 0 for c in range(int(codes.max()) + 1) if len(part := v[codes == c]))


def _codes(n: int, methods: np.ndarray | None) -> np.ndarray:
    return np.zeros(n, np.int64) if methods is None else methods


class Fit(NamedTuple):
    r2: float
    slope: float
    spearman: float
    r2_method_only: float  # NaN without methods


NO_FIT = Fit(float("nan"), float("nan"), float("nan"), float("nan"))


def fit(x: np.ndarray, y: np.ndarray, methods: np.ndarray | None = None) -> Fit:
    """y = a + b x over the finite pairs; with ``methods`` ([n] ints), y = a_method + b x (one intercept per
    method). R^2 = 1 - SSE/SST with SST about the grand mean (so with methods the intercepts count in it,
    and ``r2_method_only`` is theirs alone); Spearman of x and y (with methods: of the method-demeaned
    values). ``NO_FIT`` with fewer than 3 pairs or where x or y does not vary (within a method)."""
    keep = np.isfinite(x) & np.isfinite(y)
    x, y, codes = x[keep], y[keep], _codes(len(x), methods)[keep]
    if len(x) < 3 or not _varies(x, codes) or not _varies(y, codes):
        return NO_FIT
    k = int(codes.max()) + 1
    dx, dy = x - _group_means(x, codes, k)[codes], y - _group_means(y, codes, k)[codes]
    b = float((dx * dy).sum() / (dx * dx).sum())
    sst = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((dy - b * dx) ** 2).sum()) / sst
    method_only = float("nan") if methods is None else 1.0 - float((dy * dy).sum()) / sst
    return Fit(r2, b, _pearson(_ranks(dx), _ranks(dy)), method_only)


def loro_r2(x: np.ndarray, y: np.ndarray, runs: np.ndarray, methods: np.ndarray | None = None) -> float:
    """Leave-one-run-out R^2 of ``fit``'s model: for each run, fit on every other run's checkpoints and
    predict its own; 1 - SSE/SST over all the out-of-sample predictions (SST about the mean of every y), so
    below 0 when they do worse than the mean. ``runs``: [n] which run each checkpoint is of. NaN with fewer
    than 2 runs or where a fold cannot predict (x constant in the rest; with methods, no other run of the
    left-out run's method)."""
    keep = np.isfinite(x) & np.isfinite(y)
    x, y, runs, codes = x[keep], y[keep], runs[keep], _codes(len(x), methods)[keep]
    ids = np.unique(runs)
    if len(ids) < 2:
        return float("nan")
    k = int(codes.max()) + 1
    sse = 0.0
    for run in ids:
        out = runs == run
        xt, yt, ct = x[~out], y[~out], codes[~out]
        if len(xt) < 2 or not _varies(xt, ct) or not np.isin(codes[out], ct).all():
            return float("nan")
        mx, my = _group_means(xt, ct, k), _group_means(yt, ct, k)
        dx, dy = xt - mx[ct], yt - my[ct]
        b = (dx * dy).sum() / (dx * dx).sum()
        predicted = my[codes[out]] + b * (x[out] - mx[codes[out]])
        sse += float(((y[out] - predicted) ** 2).sum())
    sst = float(((y - y.mean()) ** 2).sum())
    return 1.0 - sse / sst if sst > 0 else float("nan")


def predictor_values(
    vectors: np.ndarray, layout: Layout, name: str, steps: np.ndarray | None = None
) -> np.ndarray:
    """A predictor's value per checkpoint from their [n, width] number vectors (``steps``: their [n]
    training steps, the ``steps`` predictor)."""
    p = PREDICTORS[name]
    if p.entry == "step":
        values = np.full(len(vectors), np.nan) if steps is None else np.asarray(steps, dtype=np.float64)
    elif p.entry in layout.slices:
        values = layout.scalar(vectors, p.entry)
    else:
        values = np.full(len(vectors), np.nan)
    return 1.0 - values if p.complement else values


@dataclass(frozen=True)
class Sample:
    """The fine-tuned checkpoints (step > 0) of some runs, one row each (a run drawn twice counts twice)."""

    whole: np.ndarray  # [n, width]: on every probe item
    halves: tuple[np.ndarray, np.ndarray] | None  # [n, width] each: even items (predictor), odd (forgetting)
    steps: np.ndarray  # [n]
    methods: np.ndarray  # [n] index into TRAINING_METHODS
    runs: np.ndarray  # [n] which of the sample's runs


_METHOD_CODE = {m: i for i, m in enumerate(TRAINING_METHODS)}


def collect(
    runs: Sequence[Run],
    whole: dict[str, np.ndarray],
    halves: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> Sample:
    """The fine-tuned checkpoints of ``runs`` from every run's vectors [points, width] (on all items, and
    on the two item halves where given)."""
    width = next(iter(whole.values())).shape[1] if whole else 0
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("whole", "even", "odd", "steps", "methods", "runs")}
    for i, run in enumerate(runs):
        tuned = np.array([p.step > 0 for p in run.points], dtype=bool)
        n = int(tuned.sum())
        parts["whole"].append(whole[run.name][tuned])
        if halves is not None:
            parts["even"].append(halves[run.name][0][tuned])
            parts["odd"].append(halves[run.name][1][tuned])
        parts["steps"].append(np.array([p.step for p in run.points], dtype=np.float64)[tuned])
        parts["methods"].append(np.full(n, _METHOD_CODE.get(run.method, len(TRAINING_METHODS))))
        parts["runs"].append(np.full(n, i))

    def stack(key: str, shape: tuple[int, ...], dtype=np.float64) -> np.ndarray:
        return np.concatenate(parts[key]) if parts[key] else np.zeros(shape, dtype)

    return Sample(
        stack("whole", (0, width)),
        (stack("even", (0, width)), stack("odd", (0, width))) if halves is not None else None,
        stack("steps", (0,)),
        stack("methods", (0,), np.int64).astype(np.int64),
        stack("runs", (0,), np.int64).astype(np.int64),
    )


def _why_not_split(runs: Sequence[Run], refs: Sequence[ProbeReference], item_split: bool) -> str | None:
    """Why the probe items cannot be split into disjoint halves (None: they can)."""
    if not item_split:
        return "analysis.predictor_item_split is off"
    for ref in refs:
        if not (ref.in_means or ref.in_forgetting):
            continue
        n = ref.base.delta.shape[1]
        lds = [ref.base.item_ld] + [p.probes[ref.name].item_ld for r in runs for p in r.points]
        if n < 2 or any(ld is None or len(ld) != n for ld in lds):
            return (
                f"probe {ref.name} has no per-item effects and LDs on the same items to split (learned "
                "masks, or a results table without per-item LDs)"
            )
    return None


def _pairing(name: str, target: str, why_not: str | None) -> tuple[str | None, str | None]:
    """(items, note) of a (predictor, forgetting) pair: "all", "split", or None (same items) and why."""
    p = PREDICTORS[name]
    if not p.items or target not in ITEM_TARGETS:
        return "all", None
    if why_not is not None:
        return None, f"read from the same probe items as the forgetting: {why_not}"
    if p.entry not in MEAN_METRICS:
        return None, "read from the same probe items as the forgetting: stored per checkpoint over all items"
    return "split", None


def _item_halves(refs: Sequence[ProbeReference]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Each probe's even- and odd-indexed items."""
    n = {ref.name: ref.base.delta.shape[1] for ref in refs if ref.base.delta.shape[1] >= 2}
    return {k: np.arange(0, v, 2) for k, v in n.items()}, {k: np.arange(1, v, 2) for k, v in n.items()}


def _half_numbers(
    runs: Sequence[Run],
    refs: Sequence[ProbeReference],
    layout: Layout,
    even: dict[str, np.ndarray],
    odd: dict[str, np.ndarray],
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every run's vectors [points, width] on the ``even`` and on the ``odd`` items of each probe (NaN at
    step 0: no fit reads it)."""
    skipped = np.full(layout.size, np.nan)

    def numbers(point, items: dict[str, np.ndarray]) -> np.ndarray:
        return checkpoint_numbers(point, refs, layout, items) if point.step > 0 else skipped

    return {
        r.name: tuple(np.stack([numbers(p, items) for p in r.points]) for items in (even, odd)) for r in runs
    }


def _half_draws(
    runs: Sequence[Run], refs: Sequence[ProbeReference], layout: Layout, n_draws: int
) -> list[dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``n_draws`` resamples of the items within each half (the split rows' item noise)."""
    even, odd = _item_halves(refs)
    rng = np.random.default_rng(SPLIT_SEED)

    def pick(halves: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v[rng.integers(0, len(v), len(v))] for k, v in halves.items()}

    return [_half_numbers(runs, refs, layout, pick(even), pick(odd)) for _ in range(n_draws)]


def predictor_table(
    patching: str,
    runs: Sequence[Run],
    observed: dict[str, np.ndarray],
    layout: Layout,
    draws: Sequence[Draw],
    names: Sequence[str] | None,
    ci_level: float,
    *,
    refs: Sequence[ProbeReference],
    item_split: bool,
) -> pl.DataFrame:
    """PREDICTORS_SCHEMA rows of one patching method, per forgetting measure in ``GROUPS`` order.
    ``observed``: every run's vectors on all items [points, width]; ``draws``: ``dcv.matched.resample``'s;
    ``names``: the predictors asked for (None: every one with a value; one asked for without a value gets
    a "not measured" row; ``steps``, the baseline, is always added); ``refs``: the probes, whose numbers
    the item split recomputes per half from the runs' points; ``item_split``:
    ``analysis.predictor_item_split``."""
    by_method = runs_by_method(runs)
    everything = collect(runs, observed)
    measured = [
        n
        for n in PREDICTORS
        if np.isfinite(predictor_values(everything.whole, layout, n, everything.steps)).any()
    ]
    names = measured if names is None else list(names)
    names += [] if "steps" in names else ["steps"]
    targets = [
        t for t in TARGETS if t in layout.slices and np.isfinite(layout.scalar(everything.whole, t)).any()
    ]
    why_not = _why_not_split(runs, refs, item_split)
    # An unmeasured predictor has no items to pair (its row says "not measured").
    pairings = {
        t: {n: _pairing(n, t, why_not) if n in measured else ("all", None) for n in names} for t in targets
    }
    split = any(pairings[t][n][0] == "split" for t in targets for n in names)
    halves = _half_numbers(runs, refs, layout, *_item_halves(refs)) if split else None
    half_draws = _half_draws(runs, refs, layout, len(draws)) if split else [None] * len(draws)
    groups = {}
    for training, methods in GROUPS.items():
        group_runs = [r for m in methods for r in by_method[m]]
        sampled = [
            collect([by_method[m][i] for m in methods if m in chosen for i in chosen[m]], numbers, half)
            for (chosen, numbers), half in zip(draws, half_draws, strict=True)
        ]
        counts = {m: len(by_method[m]) for m in methods}
        fewest = min(counts, key=counts.get)
        power = None
        if counts[fewest] < MIN_VERDICT_RUNS:
            power = f"{counts[fewest]} runs" + (f" of {fewest}" if len(methods) > 1 else "")
        groups[training] = (len(group_runs), collect(group_runs, observed, halves), sampled, power)
    rows = []
    for target in targets:
        for training, (n_runs, obs, sampled, power) in groups.items():
            where = {"patching": patching, "forgetting": target, "training": training, "n_runs": n_runs}
            rows += _group_rows(
                where, names, measured, pairings[target], obs, sampled, layout, ci_level, power
            )
    return pl.DataFrame(rows, schema=PREDICTORS_SCHEMA)


def _xy(sample: Sample, layout: Layout, name: str, target: str, items: str | None) -> tuple:
    """(predictor, forgetting) per checkpoint of ``sample``: on the two halves for a split pair, else on
    every item."""
    x_from, y_from = sample.halves if items == "split" else (sample.whole, sample.whole)
    return predictor_values(x_from, layout, name, sample.steps), layout.scalar(y_from, target)


def _group_rows(
    where: dict,
    names: Sequence[str],
    measured: Sequence[str],
    pairing: dict[str, tuple[str | None, str | None]],
    obs: Sample,
    sampled: Sequence[Sample],
    layout: Layout,
    ci_level: float,
    power: str | None,
) -> list[dict]:
    """The rows of one (forgetting, training) group (``where``): each predictor's fit, CIs and gap to the
    best. ``pairing``: each predictor's (items, note) (``_pairing``); ``power``: why the group gets no
    versus_best verdict (too few runs of a method), None where it does."""
    names, target = list(names), where["forgetting"]
    fixed_effect = where["training"] == FIXED_EFFECT

    def fitted(sample: Sample, name: str) -> Fit:
        x, y = _xy(sample, layout, name, target, pairing[name][0])
        return fit(x, y, sample.methods if fixed_effect else None)

    reported = [n for n in names if n in measured and pairing[n][0] is not None]
    point = {n: fitted(obs, n) for n in reported}
    draws = np.full((len(sampled), len(names), 2), np.nan)  # [B, predictor, (r2, spearman)]
    for b, sample in enumerate(sampled):
        for j, name in enumerate(names):
            if name in point:
                f = fitted(sample, name)
                draws[b, j] = f.r2, f.spearman
    finite = {n: f.r2 for n, f in point.items() if np.isfinite(f.r2)}
    best = max(finite, key=finite.get) if finite else None
    r2_low, r2_high, _, valid = interval(draws[:, :, 0], ci_level)
    rho_low, rho_high, _, _ = interval(draws[:, :, 1], ci_level)
    if best is not None:
        gap = draws[:, names.index(best), 0][:, None] - draws[:, :, 0]
        gap_low, gap_high, _, _ = interval(gap, ci_level)
    rows = []
    for j, name in enumerate(names):
        items, note = pairing[name]
        x, y = _xy(obs, layout, name, target, items)
        n_both = int((np.isfinite(x) & np.isfinite(y)).sum())
        row = {
            **where,
            "predictor": name,
            "items": items,
            "n_checkpoints": n_both,
            "n_resamples": int(valid[j]),
        }
        if name not in measured:
            rows.append({**row, "status": "not measured", "items": None, "note": PREDICTORS[name].needs})
            continue
        if items is None:
            rows.append({**row, "status": "same items", "note": note})
            continue
        if n_both < 3:
            rows.append({**row, "status": "too few checkpoints"})
            continue
        f = point[name]
        if not np.isfinite(f.r2):
            rows.append({**row, "status": "no variation"})
            continue
        row |= {
            "status": "ok",
            "r2": f.r2,
            "r2_ci_low": float(r2_low[j]),
            "r2_ci_high": float(r2_high[j]),
            "r2_method_only": f.r2_method_only,
            "r2_loro": loro_r2(x, y, obs.runs, obs.methods if fixed_effect else None),
            "slope": f.slope,
            "spearman": f.spearman,
            "spearman_ci_low": float(rho_low[j]),
            "spearman_ci_high": float(rho_high[j]),
            "r2_below_best": finite[best] - f.r2,
            "below_best_ci_low": float(gap_low[j]),
            "below_best_ci_high": float(gap_high[j]),
        }
        if name == best:
            row["versus_best"] = "best"
        elif power is not None:
            row["versus_best"] = f"{NOT_DISTINGUISHABLE} ({power})"
        else:
            resolved = gap_low[j] > 0 or gap_high[j] < 0
            row["versus_best"] = "below best" if resolved else NOT_DISTINGUISHABLE
        rows.append(row)
    return rows


WEIGHT_FUNCTION_SCHEMA = {
    "patching": pl.String,
    "probe": pl.String,
    "training": pl.String,
    "trial": pl.String,  # "pooled": every checkpoint of the method, (head, checkpoint) pairs
    "step": pl.Int64,  # null for pooled rows
    "n_checkpoints": pl.Int64,
    "n_heads": pl.Int64,  # base-circuit heads with both numbers (pooled: pairs)
    "spearman_v": pl.Float64,  # of the head's weight change with its v_h (relative)
    "spearman_v_abs": pl.Float64,  # with its v_h (absolute: base gap)
    "circuit_change": pl.Float64,  # mean weight change of the base-circuit heads
    "other_change": pl.Float64,  # mean weight change of every other head
}


def weight_function_table(
    patching: str,
    checkpoints: Sequence[tuple[str, str, int, str, np.ndarray]],
    refs: Sequence[ProbeReference],
    layout: Layout,
    changes: dict[str, np.ndarray],
) -> pl.DataFrame:
    """WEIGHT_FUNCTION_SCHEMA rows. ``checkpoints``: (training, trial, step, model, number vector) of every
    fine-tuned checkpoint; ``changes``: per model, each head's ``change`` in (layer, head) order (the
    order of ``ProbeReference.circuit``'s indices). Checkpoints without weight change are left out."""
    rows = []
    pooled: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    for training, trial, step, model, vector in checkpoints:
        if model not in changes:
            continue
        change = changes[model]
        for ref in refs:
            if not ref.circuit.size:
                continue
            w = change[ref.circuit]
            v, v_abs = layout.get(vector, f"{ref.name}/v"), layout.get(vector, f"{ref.name}/v_abs")
            pooled.setdefault((ref.name, training), []).append((w, v, v_abs))
            others = np.delete(change, ref.circuit)
            rows.append(_weight_row(patching, ref.name, training, trial, step, 1, w, v, v_abs, others))
    for (probe, training), parts in pooled.items():
        w, v, v_abs = (np.concatenate(p) for p in zip(*parts, strict=True))
        rows.append(_weight_row(patching, probe, training, "pooled", None, len(parts), w, v, v_abs, None))
    return pl.DataFrame(rows, schema=WEIGHT_FUNCTION_SCHEMA)


def _weight_row(patching, probe, training, trial, step, n, w, v, v_abs, others) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a model with one head outside: mean of nothing
        other = float(np.mean(others)) if others is not None and others.size else None
    return {
        "patching": patching,
        "probe": probe,
        "training": training,
        "trial": trial,
        "step": step,
        "n_checkpoints": n,
        "n_heads": int((np.isfinite(w) & np.isfinite(v)).sum()),
        "spearman_v": spearman(w, v),
        "spearman_v_abs": spearman(w, v_abs),
        "circuit_change": float(np.mean(w)),
        "other_change": other,
    }
