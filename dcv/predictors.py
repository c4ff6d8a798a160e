"""What predicts forgetting, and weight change against function change (DESIGN "Beyond the seed paper").

RL's Razor (Shenfeld et al. 2025) fits forgetting against the forward KL to the base on the new task
(R^2 about 0.7 for LLMs) and rules out weight change. dcv puts every candidate in one table, per patching
method (``predictor_table``): for each predictor of ``PREDICTORS`` and each forgetting measure of
``TARGETS``, over all fine-tuned checkpoints (step > 0; an RL-after-SFT run's start point is its SFT
run's), by training method and pooled:

- R^2 of the least-squares line forgetting = a + b x (the squared Pearson correlation) and Spearman's rho;
- their 95% CIs from the analysis' hierarchical bootstrap (``dcv.matched.resample``: runs within each
  method, probe items, target items; the same draws as the matched comparison), with n (checkpoints,
  runs) and the draws that had at least 3 checkpoints;
- against the best predictor of its (forgetting, training) group: the R^2 gap in the same draws, its CI,
  and ``versus_best``: "best", "below best" (the gap's CI excludes 0) or "not distinguishable at this
  power".

Each predictor is one entry of a checkpoint's number vector (``dcv.matched.Layout``): a ``PREDICTORS``
entry, a name in ``dcv.config.PREDICTOR_NAMES`` and the number in the vector. Every draw recomputes the
item-based ones (V, P, J, forgetting); KL, weight change and CMAP (``dcv.analysis.mean_cmap``: the mean
|cmap_h|, direction ckpt_into_base, over base-circuit heads, averaged over the probes in the means) are
fixed per checkpoint and move only with the runs.

``weight_function_table``: per checkpoint and probe, Spearman of each base-circuit head's weight change
(``dcv.circuits.weight_change``) with its v_h (relative and absolute), and per method over all its
checkpoints' (head, checkpoint) pairs: is a head whose weights moved also the head whose function broke?
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from dcv.matched import TRAINING_METHODS, Draw, Layout, ProbeReference, Run, interval, runs_by_method

GROUPS = {"sft": ("sft",), "rl": ("rl",), "pooled": TRAINING_METHODS}
# RL's Razor's figure for LLMs: R^2 of forgetting against forward KL on the new task (DESIGN).
RAZOR_R2 = 0.7


@dataclass(frozen=True)
class Predictor:
    label: str
    entry: str  # the Layout entry it is read from
    complement: bool  # the predictor is 1 - entry (damage grows with it)
    needs: str  # what measures it (said where it was not measured)
    short: str  # figure label


PREDICTORS = {
    "kl_to_base": Predictor(
        "KL to base (target task)", "kl_to_base", False, "the results table's kl_to_base", "KL to base"
    ),
    "weight_change": Predictor(
        "mean relative weight change of the heads",
        "weight_change",
        False,
        "weight_change.enabled: true",
        "weight change",
    ),
    "circuit_vulnerability": Predictor(
        "V (relative)", "circuit_vulnerability", False, "a probe in the means", "V (relative)"
    ),
    "circuit_vulnerability_abs": Predictor(
        "V (absolute)", "circuit_vulnerability_abs", False, "a probe in the means", "V (absolute)"
    ),
    "one_minus_preservation": Predictor("1 - P", "preservation", True, "a probe in the means", "1 - P"),
    "one_minus_jaccard": Predictor("1 - J", "jaccard", True, "a probe in the means", "1 - J"),
    "cmap": Predictor(
        "mean |CMAP| over base-circuit heads (checkpoint into base)",
        "cmap",
        False,
        "patching.methods with cmap",
        "CMAP",
    ),
}
TARGETS = {
    "forgetting": "forgetting (probe accuracy)",
    "forgetting_ld": "forgetting (mean LD)",
    "forgetting_bench": "forgetting (benchmarks)",
}
PREDICTORS_SCHEMA = {
    "patching": pl.String,
    "predictor": pl.String,
    "forgetting": pl.String,  # which forgetting measure (TARGETS)
    "training": pl.String,  # sft | rl | pooled
    # ok | not measured (the predictor has no value) | too few checkpoints (< 3 with both numbers) |
    # no variation (the predictor or forgetting is constant over the checkpoints)
    "status": pl.String,
    "r2": pl.Float64,
    "r2_ci_low": pl.Float64,
    "r2_ci_high": pl.Float64,
    "spearman": pl.Float64,
    "spearman_ci_low": pl.Float64,
    "spearman_ci_high": pl.Float64,
    "r2_below_best": pl.Float64,  # R^2 of the group's best predictor minus this one's
    "below_best_ci_low": pl.Float64,
    "below_best_ci_high": pl.Float64,
    "versus_best": pl.String,  # best | below best | not distinguishable at this power
    "n_checkpoints": pl.Int64,
    "n_runs": pl.Int64,
    "n_resamples": pl.Int64,  # bootstrap draws with at least 3 checkpoints with both numbers
    "note": pl.String,  # for "not measured": what measures it
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


def fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(R^2 of y = a + b x, Spearman) over the finite pairs; NaN where ``spearman`` is None."""
    rho = spearman(x, y)
    if rho is None:
        return float("nan"), float("nan")
    keep = np.isfinite(x) & np.isfinite(y)
    r = _pearson(x[keep], y[keep])
    return r * r, rho


def predictor_values(vectors: np.ndarray, layout: Layout, name: str) -> np.ndarray:
    """A predictor's value per checkpoint from their [n, width] number vectors."""
    p = PREDICTORS[name]
    values = layout.scalar(vectors, p.entry) if p.entry in layout.slices else np.full(len(vectors), np.nan)
    return 1.0 - values if p.complement else values


def _tuned(runs: Sequence[Run], numbers: dict[str, np.ndarray]) -> np.ndarray:
    """The fine-tuned checkpoints' vectors (step > 0) of ``runs`` (repeats count again), [n, width]."""
    rows = [numbers[r.name][[p.step > 0 for p in r.points]] for r in runs]
    width = next(iter(numbers.values())).shape[1] if numbers else 0
    return np.concatenate(rows) if rows else np.zeros((0, width))


def predictor_table(
    patching: str,
    runs: Sequence[Run],
    observed: dict[str, np.ndarray],
    layout: Layout,
    draws: Sequence[Draw],
    names: Sequence[str] | None,
    ci_level: float,
) -> pl.DataFrame:
    """PREDICTORS_SCHEMA rows of one patching method. ``observed``: every run's vectors on all items
    [points, width]; ``draws``: ``dcv.matched.resample``'s; ``names``: the predictors asked for (None:
    every one with a value; one asked for without a value gets a "not measured" row)."""
    by_method = runs_by_method(runs)
    everything = _tuned(runs, observed)
    measured = [n for n in PREDICTORS if np.isfinite(predictor_values(everything, layout, n)).any()]
    names = measured if names is None else list(names)
    rows = []
    for target in TARGETS:
        if target not in layout.slices or not np.isfinite(layout.scalar(everything, target)).any():
            continue  # e.g. no benchmarks
        for training, methods in GROUPS.items():
            group_runs = [r for m in methods for r in by_method[m]]
            obs = _tuned(group_runs, observed)
            sampled = [
                _tuned([by_method[m][i] for m in methods if m in chosen for i in chosen[m]], numbers)
                for chosen, numbers in draws
            ]
            where = {
                "patching": patching,
                "forgetting": target,
                "training": training,
                "n_runs": len(group_runs),
            }
            rows += _group_rows(where, names, measured, obs, sampled, layout, ci_level)
    return pl.DataFrame(rows, schema=PREDICTORS_SCHEMA)


def _group_rows(
    where: dict,
    names: Sequence[str],
    measured: Sequence[str],
    obs: np.ndarray,
    sampled: Sequence[np.ndarray],
    layout: Layout,
    ci_level: float,
) -> list[dict]:
    """The rows of one (forgetting, training) group (``where``): each predictor's fit, CIs and gap to the
    best."""
    names, target = list(names), where["forgetting"]
    y = layout.scalar(obs, target)
    point = {n: fit(predictor_values(obs, layout, n), y) for n in names}
    draws = np.full((len(sampled), len(names), 2), np.nan)  # [B, predictor, (r2, spearman)]
    for b, vectors in enumerate(sampled):
        y_b = layout.scalar(vectors, target)
        for j, name in enumerate(names):
            draws[b, j] = fit(predictor_values(vectors, layout, name), y_b)
    finite = {n: v[0] for n, v in point.items() if np.isfinite(v[0])}
    best = max(finite, key=finite.get) if finite else None
    r2_low, r2_high, _, valid = interval(draws[:, :, 0], ci_level)
    rho_low, rho_high, _, _ = interval(draws[:, :, 1], ci_level)
    if best is not None:
        gap = draws[:, names.index(best), 0][:, None] - draws[:, :, 0]
        gap_low, gap_high, _, _ = interval(gap, ci_level)
    rows = []
    for j, name in enumerate(names):
        x = predictor_values(obs, layout, name)
        n_both = int((np.isfinite(x) & np.isfinite(y)).sum())
        row = {
            **where,
            "predictor": name,
            "n_checkpoints": n_both,
            "n_resamples": int(valid[j]),
        }
        if name not in measured:
            rows.append({**row, "status": "not measured", "note": PREDICTORS[name].needs})
            continue
        r2, rho = point[name]
        if n_both < 3:
            rows.append({**row, "status": "too few checkpoints"})
            continue
        if not np.isfinite(r2):
            rows.append({**row, "status": "no variation"})
            continue
        row |= {
            "status": "ok",
            "r2": r2,
            "r2_ci_low": float(r2_low[j]),
            "r2_ci_high": float(r2_high[j]),
            "spearman": rho,
            "spearman_ci_low": float(rho_low[j]),
            "spearman_ci_high": float(rho_high[j]),
            "r2_below_best": finite[best] - r2,
            "below_best_ci_low": float(gap_low[j]),
            "below_best_ci_high": float(gap_high[j]),
        }
        if name == best:
            row["versus_best"] = "best"
        else:
            resolved = gap_low[j] > 0 or gap_high[j] < 0
            row["versus_best"] = "below best" if resolved else "not distinguishable at this power"
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
