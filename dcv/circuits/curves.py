"""Faithfulness curves: the base circuit's faithfulness over circuit sizes, and their areas (MIB's CPR, CMD).

A circuit at one size is one point. MIB (Mueller et al. 2025) scores circuit discovery by the curve of
faithfulness F(C_k) of the top-k heads over a grid of circuit sizes, given as fractions of all heads:

- **CPR** (integrated circuit performance ratio, higher is better): the area under F over the fraction
  axis, divided by the axis span (so a curve at 1 everywhere has CPR 1);
- **CMD** (circuit-model difference, lower is better): the area of |1 - F|, divided the same way.

F is the piecewise-linear curve through the grid's points (the trapezoid rule); CMD integrates |1 - F| of
that same line exactly (a segment that crosses 1 is split where it does). Here the heads are ranked by
the *base* model's |e_h| (``rank_heads``) and F(C_k(base), M) is computed in every model M, so a
checkpoint's curve shows at which size the base circuit stops carrying the behaviour, independent of one
tau. Fraction f means k = ceil(f * n_heads) heads (at least 1); on a small model several fractions give
the same k, which is scored once. An empty grid turns the curves off (``circuits.curve_fractions``).

The grid, the areas and the analysis' curve tables (``curve_tables``) are pure numpy/polars (the analysis
uses them without torch); ``faithfulness_curve`` is the one function that runs a model, through
``dcv.circuits.circuit.faithfulness``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import polars as pl

from dcv.storage import BASE_MODEL
from dcv.tables import Head


def curve_sizes(fractions: Sequence[float], n_heads: int) -> list[int]:
    """k for each fraction of ``n_heads``: ceil(f * n_heads), at least 1 and at most n_heads."""
    if n_heads < 1:
        raise ValueError(f"curve_sizes: n_heads={n_heads} must be at least 1")
    # The epsilon keeps a fraction that is exact in decimal (0.1 * 270 = 27.000000000000004) at its k.
    return [min(n_heads, max(1, math.ceil(f * n_heads - 1e-9))) for f in fractions]


def curve_areas(fractions: Sequence[float], values: Sequence[float]) -> tuple[float, float]:
    """(CPR, CMD) of the curve through (fraction, F) points, fractions increasing.

    One point: (F, |1 - F|). A non-finite F anywhere gives (nan, nan)."""
    x, y = np.asarray(fractions, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or not x.size:
        raise ValueError(f"curve_areas: {x.size} fractions and {y.size} values; need equal, non-empty")
    if np.any(np.diff(x) <= 0):
        raise ValueError(f"curve_areas: fractions {x.tolist()} must increase")
    if not np.isfinite(y).all():
        return float("nan"), float("nan")
    if x.size == 1:
        return float(y[0]), float(abs(1.0 - y[0]))
    dx, span = np.diff(x), x[-1] - x[0]
    cpr = float(np.sum(dx * (y[1:] + y[:-1]) / 2) / span)
    d = 1.0 - y  # |d| is linear between points where d keeps its sign; split a segment where it crosses 0
    a, b = d[:-1], d[1:]
    same = a * b >= 0
    magnitude = np.abs(a) + np.abs(b)
    crossing = np.divide(a * a + b * b, 2 * magnitude, out=np.zeros_like(a), where=magnitude > 0)
    cmd = float(np.sum(dx * np.where(same, np.abs(a + b) / 2, crossing)) / span)
    return cpr, cmd


def faithfulness_curve(
    model,
    items: Sequence,
    ranking: Sequence[Head],
    fractions: Sequence[float],
    batch_size: int = 16,
) -> tuple[list[int], list[float]]:
    """(k, F(top-k of ``ranking``, model)) for each fraction of ``len(ranking)`` heads; each distinct k
    is scored once (``dcv.circuits.circuit.faithfulness``, all sets in one call). When ``ranking`` holds
    every head of the model, its full set patches nothing: F = 1 by definition, not run (on SmolLM2's
    270 heads that leaves MIB's grid at 8 sets, one batched forward of ``faithfulness``)."""
    from dcv.circuits.circuit import faithfulness
    from dcv.circuits.decoder import model_shape

    sizes = curve_sizes(fractions, len(ranking))
    every = len(ranking) == len(model_shape(model).heads)
    by_k = {len(ranking): 1.0} if every else {}
    distinct = sorted(set(sizes) - set(by_k))
    if distinct:
        scores = faithfulness(model, items, [set(ranking[:k]) for k in distinct], batch_size)
        by_k |= dict(zip(distinct, scores, strict=True))
    return sizes, [by_k[k] for k in sizes]


# What the analysis adds to each curve: the checkpoint it belongs to (``dcv.analysis`` checkpoints table).
_CHECKPOINT_KEYS = (
    "trial",
    "training",
    "init",
    "learning_rate",
    "seed",
    "step",
    "model",
    "patching",
    "probe",
)
AREAS_SCHEMA = {
    "trial": pl.String,
    "training": pl.String,
    "init": pl.String,
    "learning_rate": pl.Float64,
    "seed": pl.Int64,
    "step": pl.Int64,
    "model": pl.String,
    "patching": pl.String,
    "probe": pl.String,  # or "mean": over the probes in means whose numbers are kept
    "status": pl.String,  # the checkpoints table's; "lost" keeps no areas
    "in_means": pl.Boolean,
    "cpr": pl.Float64,  # area under F(C_k(base), M) over the fraction axis / its span; higher is better
    "cmd": pl.Float64,  # area of |1 - F| the same way; lower is better
    "n_probes": pl.Int64,  # probes behind a "mean" row (1 otherwise)
}
MEANS_KEYS = ("patching", "training", "step", "probe")


def curve_tables(curves: pl.DataFrame, checkpoints: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """The analysis' curve tables from the stored curves (``dcv.tables.faithfulness_curves``) and the
    analysis' checkpoints table (one row per trial, step, probe and patching method, with its status):

    - ``faithfulness_areas``: CPR and CMD per checkpoint and probe, and their mean over the probes in means
      (probe "mean"); null where the checkpoint lost the behaviour (F divides by its own gap);
    - ``faithfulness_curve_means``: per patching method, training method ("base" for the base model, step
      0), step, probe (and "mean") and fraction, the plain mean of F over runs with n_runs;
    - ``faithfulness_area_means``: the same for CPR and CMD.

    Means are per step over runs, not at matched levels (a plain mean, no CI)."""
    if curves.is_empty() or checkpoints.is_empty():
        return {
            "faithfulness_areas": pl.DataFrame(schema=AREAS_SCHEMA),
            "faithfulness_curve_means": pl.DataFrame(),
            "faithfulness_area_means": pl.DataFrame(),
        }
    rows = []
    for (model, method, probe), group in curves.group_by("model", "method", "probe", maintain_order=True):
        group = group.sort("fraction")
        cpr, cmd = curve_areas(group["fraction"].to_list(), group["faithfulness"].to_list())
        rows.append({"model": model, "patching": method, "probe": probe, "cpr": cpr, "cmd": cmd})
    area = pl.DataFrame(
        rows,
        schema={"model": pl.String, "patching": pl.String, "probe": pl.String}
        | {"cpr": pl.Float64, "cmd": pl.Float64},
    )
    points = checkpoints.select(*_CHECKPOINT_KEYS, "status", "in_means")
    kept = pl.col("status") != "lost"
    per_probe = points.join(area, on=["model", "patching", "probe"], how="inner").with_columns(
        pl.when(kept).then(pl.col(c)).alias(c) for c in ("cpr", "cmd")
    )
    keys = [k for k in _CHECKPOINT_KEYS if k != "probe"]
    mean = (
        per_probe.filter(pl.col("in_means") & kept)
        .group_by(keys, maintain_order=True)
        .agg(pl.col("cpr").mean(), pl.col("cmd").mean(), pl.len().cast(pl.Int64).alias("n_probes"))
        .with_columns(
            pl.lit("mean").alias("probe"), pl.lit("ok").alias("status"), pl.lit(True).alias("in_means")
        )
    )
    areas = (
        pl.concat([per_probe.with_columns(pl.lit(1, dtype=pl.Int64).alias("n_probes")), mean], how="diagonal")
        .select(list(AREAS_SCHEMA))
        .cast(AREAS_SCHEMA)
    )
    # Each model's curve per checkpoint row, probes in means averaged at each fraction for "mean".
    curve_points = points.join(
        curves.rename({"method": "patching"}).drop("trial", "step"), on=["model", "patching", "probe"]
    ).filter(kept)
    curve_mean = (
        curve_points.filter(pl.col("in_means"))
        .group_by([*keys, "fraction", "k"], maintain_order=True)
        .agg(pl.col("faithfulness").mean())
        .with_columns(pl.lit("mean").alias("probe"))
    )
    curve_points = pl.concat([curve_points.drop("status", "in_means"), curve_mean], how="diagonal")
    return {
        "faithfulness_areas": areas.sort("trial", "step", "patching", "probe"),
        "faithfulness_curve_means": _means(curve_points, ["faithfulness"], ["fraction", "k"]),
        "faithfulness_area_means": _means(areas, ["cpr", "cmd"], []),
    }


def _means(frame: pl.DataFrame, values: list[str], extra: list[str]) -> pl.DataFrame:
    """Per (patching, training, step, probe, *extra): the mean of ``values`` over fine-tuned runs' points
    (step > 0; a GRPO-after-SFT run's step 0 is an SFT point, left out), and the base model's once."""
    keys = [*MEANS_KEYS, *extra]
    base = (
        frame.filter(pl.col("model") == BASE_MODEL)
        .unique(["patching", "probe", *extra], keep="first", maintain_order=True)
        .with_columns(pl.lit("base").alias("training"), pl.lit(0, dtype=pl.Int64).alias("step"))
    )
    tuned = frame.filter(pl.col("step") > 0)
    both = pl.concat([base.select(*keys, *values), tuned.select(*keys, *values)])
    return (
        both.group_by(keys, maintain_order=True)
        .agg(
            *[pl.col(v).mean() for v in values],
            pl.col(values[0]).is_not_null().sum().cast(pl.Int64).alias("n_runs"),
        )
        .sort(keys)
    )
