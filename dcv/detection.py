"""Detection curves and positive-control verdicts from planted damage (docs/method.md "Calibration:
controls that can fail"): the pure half of ``dcv.calibration``, which the report and the analysis read.

Per plant and metric, ``metric_rows`` gives the value with its item-bootstrap CI, whether it is detected
(the CI lies beyond the base model's own value in the metric's damage direction, ``dcv.metrics``) and, for
a circuit plant, its separation from the random plant of the same k and alpha: damage direction x
(circuit - random), computed on every draw (the draws are shared, so the two are paired). Per probe and
metric, ``verdict`` reads the detection curve (the smallest k detected, and at that k the largest alpha)
and the positive control: at the strongest damage (smallest alpha) a metric must not move the wrong way at
any k, must detect the circuit plant at some k, and, where it is measured on circuit heads, must rank
circuit above random plants at some k. ``failing_metrics`` names the metrics that fail and why.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from dcv.matched import ProbeParts, ProbeReference, probe_numbers
from dcv.metrics import METRICS

PRECISION = "precision"  # the negative control's kind
# The metrics every plant is judged on (``dcv.metrics`` names; ``probe_numbers`` computes each).
CALIBRATION_METRICS = (
    "circuit_vulnerability_abs",
    "circuit_vulnerability",
    "preservation",
    "jaccard",
    "forgetting",
    "forgetting_ld",
)


@dataclass(frozen=True)
class Measured:
    """One model on one probe: its numbers on all items, each metric on every item draw, and v_h (absolute)
    of the base-circuit heads."""

    point: dict[str, float]
    draws: dict[str, np.ndarray]  # metric -> [n_bootstrap]
    v_abs: np.ndarray  # [circuit heads]


def measure(parts: ProbeParts, ref: ProbeReference, own: np.ndarray, draws: Sequence[np.ndarray]) -> Measured:
    """``probe_numbers`` on all items and on each draw (the same draws for every model of a probe, so
    two models' values on one draw are paired)."""
    point, _, v_abs = probe_numbers(parts, ref, own, None)
    each = [probe_numbers(parts, ref, own, d)[0] for d in draws]
    values = {m: np.array([e[m] for e in each], dtype=np.float64) for m in CALIBRATION_METRICS}
    return Measured(point, values, v_abs)


def interval(values: np.ndarray, level: float) -> tuple[float | None, float | None]:
    """The percentile CI of the finite draws (a draw where the plant is lost has no relative V, P or J);
    (None, None) when none is."""
    kept = values[np.isfinite(values)]
    if kept.size == 0:
        return None, None
    tail = (1 - level) / 2
    low, high = np.quantile(kept, [tail, 1 - tail])
    return float(low), float(high)


def beyond(low: float | None, high: float | None, base: float | None, direction: int) -> bool:
    """Whether the CI [low, high] lies strictly beyond ``base`` in ``direction`` (+1 above, -1 below)."""
    if low is None or high is None or base is None or not np.isfinite(base):
        return False
    return low > base if direction > 0 else high < base


def noise_margins(
    floor: dict[str, np.ndarray], base_ld: np.ndarray | None, draws: Sequence[np.ndarray]
) -> dict:
    """Per metric, how far item noise alone moves it (the base against itself on resampled items): a
    change within it is no damage, however tight its CI (a model at numerical precision moves V by 0.002
    with a CI that excludes 0, on the same items). P and J: 1 - their noise floor's 5th percentile; V
    (both): its 95th percentile (``bootstrap_floor``, relative; the absolute V of the base against
    itself differs only by the resample's gap); forgetting: the 95th percentile of base - resampled base
    (accuracy, mean LD)."""
    margins = {
        "preservation": 1 - float(np.quantile(floor["preservation"], 0.05)),
        "jaccard": 1 - float(np.quantile(floor["jaccard"], 0.05)),
        "circuit_vulnerability": float(np.quantile(floor["circuit_vulnerability"], 0.95)),
        "circuit_vulnerability_abs": float(np.quantile(floor["circuit_vulnerability"], 0.95)),
    }
    if base_ld is not None and draws:
        accuracy = float((base_ld > 0).mean()) - np.array([(base_ld[d] > 0).mean() for d in draws])
        mean_ld = float(base_ld.mean()) - np.array([base_ld[d].mean() for d in draws])
        margins |= {
            "forgetting": float(np.quantile(accuracy, 0.95)),
            "forgetting_ld": float(np.quantile(mean_ld, 0.95)),
        }
    return {m: max(v, 0.0) for m, v in margins.items()}


def metric_rows(
    measured: Measured,
    base: dict[str, float],
    twin: Measured | None,
    level: float,
    margins: dict[str, float] | None = None,
) -> list[dict]:
    """One row per metric of one plant: value, CI and whether it is detected (its CI beyond the base's
    value in the damage direction, and the change beyond the metric's noise margin, ``noise_margins``);
    with ``twin`` (the random plant of a circuit plant's k and alpha) the separation, damage x (circuit -
    random), on all items and on every draw."""
    margins = margins or {}
    rows = []
    for metric in CALIBRATION_METRICS:
        damage = METRICS[metric].damage
        value = measured.point[metric]
        low, high = interval(measured.draws[metric], level) if np.isfinite(value) else (None, None)
        margin = margins.get(metric, 0.0)
        change = damage * (value - base[metric]) if np.isfinite(value) and np.isfinite(base[metric]) else 0.0
        row = {
            "metric": metric,
            "damage": damage,
            "base_value": finite(base[metric]),
            "value": finite(value),
            "ci_low": low,
            "ci_high": high,
            "noise_margin": margin,
            "detected": beyond(low, high, base[metric], damage) and change > margin,
        }
        if twin is not None:
            separation = damage * (value - twin.point[metric])
            draws = damage * (measured.draws[metric] - twin.draws[metric])
            s_low, s_high = interval(draws, level) if np.isfinite(separation) else (None, None)
            row |= {
                "separation": finite(separation),
                "separation_ci_low": s_low,
                "separation_ci_high": s_high,
                "separates": beyond(s_low, s_high, 0.0, +1),
            }
        rows.append(row)
    return rows


def verdict(metric: str, rows: Sequence[dict]) -> dict:
    """Per probe and metric, from its rows: the detection curve's weakest detected damage (the smallest k
    of a detected circuit plant, and at that k the largest alpha) and the positive control. At the strongest
    damage (smallest alpha) the metric must not move the wrong way at any k, must detect the circuit plant
    at some k, and, measured on circuit heads, must separate it from the random plant at some k."""
    circuit = [r for r in rows if r["kind"] == "circuit"]
    found = sorted((r["k"], -r["alpha"]) for r in circuit if r["detected"])
    out = {
        "min_detectable_k": found[0][0] if found else None,
        "min_detectable_alpha": -found[0][1] if found else None,
    }
    if not circuit:
        return out | {"passes_positive_control": None, "failure": "no circuit plant", "invalid": False}
    strongest = min(r["alpha"] for r in circuit)
    at = sorted((r for r in circuit if r["alpha"] == strongest), key=lambda r: r["k"])
    damage = "ablated" if strongest == 0 else f"scaled by {strongest:g}"
    wrong = [r for r in at if beyond(r["ci_low"], r["ci_high"], r["base_value"], -r["damage"])]
    if wrong:
        moves = ", ".join(
            f"k={r['k']}: {r['value']:.3g} [{r['ci_low']:.3g}, {r['ci_high']:.3g}] against base "
            f"{r['base_value']:.3g}"
            for r in wrong
        )
        failure = f"moves the wrong way when the top circuit heads are {damage} ({moves})"
    elif not any(r["detected"] for r in at):
        ks = ", ".join(str(r["k"]) for r in at)
        failure = f"does not detect the top circuit heads {damage} at any k ({ks})"
    elif METRICS[metric].circuit and not any(r["separates"] for r in at):
        failure = f"does not rank circuit plants above random plants of the same size ({damage}) at any k"
    else:
        failure = None
    # A metric that moves the wrong way, or claims circuit damage and cannot tell circuit from random
    # heads, measures the wrong thing: it leaves the answer. One that detects nothing here may lack power.
    invalid = failure is not None and not failure.startswith("does not detect")
    return out | {"passes_positive_control": failure is None, "failure": failure, "invalid": invalid}


def failing_metrics(
    calibration: pl.DataFrame | None, circuit_probes: Collection[str] | None = None
) -> dict[str, str]:
    """Metric -> why it fails its positive control as an instrument (moves the wrong way, or a circuit
    metric that does not separate circuit from random plants), for each metric that does so on any
    calibrated probe that enters its mean in the answer (a metric wrong on one of them is wrong in the
    mean): ``circuit_probes`` are the probes in the means of P, J and V (None: every calibrated probe);
    forgetting averages every calibrated prior probe. A metric that only detected nothing is not listed:
    that is the calibration's power, said elsewhere."""
    if calibration is None or calibration.is_empty() or "invalid" not in calibration.columns:
        return {}
    reasons: dict[str, list[str]] = {}
    verdicts = calibration.unique(["probe", "metric"], maintain_order=True)
    if circuit_probes is not None:
        circuit = [m for m in CALIBRATION_METRICS if METRICS[m].circuit]
        verdicts = verdicts.filter(
            ~pl.col("metric").is_in(circuit) | pl.col("probe").is_in(list(circuit_probes))
        )
    for row in verdicts.filter(pl.col("invalid")).iter_rows(named=True):
        reasons.setdefault(row["metric"], []).append(f"{row['probe']}: {row['failure']}")
    return {metric: "; ".join(parts) for metric, parts in reasons.items()}


def finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def verdict_table(calibration: pl.DataFrame) -> pl.DataFrame:
    """One row per probe and metric: the positive control's verdict and why not, the weakest damage
    detected, and the ks at which circuit plants separate from random ones at the strongest damage."""
    circuit = calibration.filter(pl.col("kind") == "circuit")
    strongest = circuit.filter(pl.col("alpha") == pl.col("alpha").min().over("probe"))
    return (
        strongest.group_by("probe", "metric", maintain_order=True)
        .agg(
            pl.col("passes_positive_control").first(),
            pl.col("failure").first(),
            pl.col("min_detectable_k").first(),
            pl.col("min_detectable_alpha").first(),
            pl.col("alpha").first().alias("strongest_alpha"),
            pl.col("k").filter(pl.col("separates")).alias("separates_at_k"),
        )
        .with_columns(pl.col("separates_at_k").list.eval(pl.element().cast(pl.String)).list.join(", "))
    )


def plant_table(calibration: pl.DataFrame) -> pl.DataFrame:
    """One row per probe and plant, a cell per metric: "value [CI]", with " *" where the metric flags it
    (a detection; on the precision copy a false positive)."""
    cell = pl.format(
        "{} [{}, {}]{}",
        pl.col("value").round_sig_figs(3),
        pl.col("ci_low").round_sig_figs(3),
        pl.col("ci_high").round_sig_figs(3),
        pl.when(pl.col("flagged")).then(pl.lit(" *")).otherwise(pl.lit("")),
    )
    long = calibration.with_columns(
        pl.when(pl.col("value").is_null()).then(pl.lit("-")).otherwise(cell).alias("cell")
    )
    return long.pivot(
        on="metric",
        index=["probe", "kind", "k", "alpha", "heads", "lost"],
        values="cell",
        maintain_order=True,
    )
