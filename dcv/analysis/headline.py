"""The matched comparison's tables: ``headline`` (SFT vs RL per matched level and metric, both levels of
claim, roles and Holm) and ``dcv_heads`` (DCV_h per base-circuit head); their report sections, the
matched grid (``grid_section``) and the heads with the largest |DCV| (``top_heads_section``). The answer,
which reads the headline beside the base circuits and the calibration, is ``dcv.report``'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from dcv.analysis.inputs import Analysis, Inputs, effects_frame, or_none
from dcv.analysis.section import Block, Page
from dcv.config import ExperimentConfig
from dcv.matched import (
    TRAINING_METHODS,
    Run,
    across_seeds,
    bonferroni,
    compare,
    grid,
    holm,
    interval,
)
from dcv.metrics import ANSWER_METRICS, HEADLINE_METRICS, METRICS
from dcv.storage import BASE_MODEL

MATCHED_ON = {"accuracy": "target_accuracy", "kl": "kl_to_base"}  # the number each axis matches on


def run_list(inputs: Inputs, summary: pl.DataFrame) -> list[Run]:
    """Every fine-tuning run as matched-comparison points; an RL-after-SFT run's step 0 is its SFT start
    point, never a point of RL."""
    runs = []
    rows = summary.filter(pl.col("patching") == inputs.method)
    for (trial,), frame in rows.group_by("trial", maintain_order=True):
        frame = frame.sort("step")
        method = frame["training"][0]
        kept = frame.filter(~((pl.col("step") == 0) & pl.col("init").str.starts_with("sft:")))
        points = tuple(inputs.points[key] for key in kept.select("model", "step").iter_rows())
        if points:
            runs.append(Run(trial, method, points))
    return runs


HEADLINE_SCHEMA = {
    "patching": pl.String,
    "matched_by": pl.String,  # accuracy | kl | step
    "matched_at": pl.Float64,
    # "ok"; "insufficient runs" (fewer than analysis.min_runs runs of a method reach the level: no numbers);
    # "no variation" (the these-runs CI holds one value: at least 95% of item draws agree)
    "status": pl.String,
    "metric": pl.String,
    "training": pl.String,  # sft | rl | sft-rl
    # primary (analysis.primary) | secondary (another answer metric at a stated level: Holm family) |
    # other (the rest: tables only, no verdict)
    "role": pl.String,
    "mean": pl.Float64,  # over the runs that reach the level
    # These runs: the item bootstrap (probe and target items, every run kept), conditional on the runs.
    "ci_low": pl.Float64,
    "ci_high": pl.Float64,
    "se": pl.Float64,
    "p_runs": pl.Float64,  # sft-rl: the item bootstrap's two-sided p (2 x the smaller tail share)
    "verdict_runs": pl.String,  # sft-rl primary/secondary: higher/lower under SFT in these runs, or not
    # Across seeds (``dcv.matched.across_seeds``): Welch's t on the runs' values, item variance folded in.
    "seed_ci_low": pl.Float64,
    "seed_ci_high": pl.Float64,
    "seed_se": pl.Float64,
    "seed_df": pl.Float64,  # Satterthwaite's
    "p_value": pl.Float64,  # two-sided, unadjusted
    "p_adjusted": pl.Float64,  # primary: p_value; secondary: Holm across the family of its patching method
    "verdict_seeds": pl.String,  # higher/lower under SFT, or not distinguishable at this power
    "mde": pl.Float64,  # sft-rl: (t_{0.975,df} + t_{0.8,df}) x seed_se: 80% power, two-sided 5%
    "runs_needed": pl.Int64,  # runs per method at which the observed difference is the MDE (null: > 100)
    "chance": pl.Float64,  # sft, rl: the value a random head set of the same sizes would score (P, J)
    "n_resamples": pl.Int64,  # item draws in which both methods had a run at the level
    "start_reached": pl.Float64,  # share of draws in which a run's resampled start reached the level
    "n_runs_sft": pl.Int64,
    "n_runs_rl": pl.Int64,
    "n_probe_items": pl.Int64,  # items per probe (the smallest probe's)
    "probe_items": pl.String,  # every probe's items: "ioi 32, capitals 32, induction 16"
    "n_target_items": pl.Int64,  # target test items resampled (0: not stored, accuracy not resampled)
}
HIGHER, LOWER, UNRESOLVED = "higher under SFT", "lower under SFT", "not distinguishable at this power"


def _bootstrap_p(draws: np.ndarray) -> np.ndarray:
    """Two-sided bootstrap p per column: twice the smaller share of finite draws on either side of 0."""
    finite = np.isfinite(draws)
    n = np.maximum(finite.sum(axis=0), 1)
    below = ((draws <= 0) & finite).sum(axis=0) / n
    above = ((draws >= 0) & finite).sum(axis=0) / n
    return np.minimum(1.0, 2 * np.minimum(below, above))


def matched_tables(
    cfg: ExperimentConfig, inputs: Inputs, runs: Sequence[Run], draws: Sequence
) -> tuple[list[dict], list[pl.DataFrame]]:
    """(headline rows, dcv_heads frames) of one patching method on the matched grid (``draws``: the
    item bootstrap's, ``dcv.matched.resample``). Roles and verdicts come from ``assign_roles``."""
    base = inputs.points[(BASE_MODEL, 0)]
    a = cfg.analysis
    levels = grid(runs, base.accuracy, a.accuracy_step, a.kl_levels)
    if a.primary.level is not None and a.primary.level not in levels[a.primary.axis]:
        levels[a.primary.axis] = sorted([*levels[a.primary.axis], a.primary.level])
    c = cfg.circuits
    alpha = 1 - c.ci_level
    compared = compare(runs, inputs.refs, inputs.layout, levels, a.min_runs, c.n_bootstrap, draws=draws)
    n_probe_items = min(ref.base.denominator.shape[0] for ref in inputs.refs)
    probe_items = ", ".join(f"{ref.name} {ref.base.denominator.shape[0]}" for ref in inputs.refs)
    n_target = max((p.correct.shape[0] for r in runs for p in r.points if p.correct is not None), default=0)
    common = {
        "patching": inputs.method,
        "n_probe_items": n_probe_items,
        "probe_items": probe_items,
        "n_target_items": n_target,
    }
    rows, heads = [], []
    for level in compared:
        where = {**common, "matched_by": level.axis, "matched_at": level.value}
        runs_of = {"n_runs_sft": level.n_runs["sft"], "n_runs_rl": level.n_runs["rl"]}
        if not level.used:
            rows.append({**where, **runs_of, "status": "insufficient runs"})
            continue
        bounds = {k: interval(v, c.ci_level) for k, v in level.draws.items()}
        seeds = across_seeds(level.values, level.draws["sft-rl"], n_probe_items, alpha)
        p_runs = _bootstrap_p(level.draws["sft-rl"])
        for metric in HEADLINE_METRICS:
            if metric == MATCHED_ON.get(level.axis):
                continue  # equal to the level by construction: not a comparison
            at = inputs.layout.slices[metric].start
            if not np.isfinite([level.mean[m][at] for m in TRAINING_METHODS]).all():
                continue  # no such number here (no benchmarks, no probe in means)
            chance = METRICS[metric].chance
            for training in (*TRAINING_METHODS, "sft-rl"):
                low, high, se, valid = (b[at] for b in bounds[training])
                # The CI holds one value (e.g. no run lost a probe, or 95% of draws keep every circuit head):
                # a fact about these runs and items, printed as such, never as an interval.
                constant = bool(low == high)
                row = {
                    **where,
                    **runs_of,
                    "status": "no variation" if constant else "ok",
                    "metric": metric,
                    "training": training,
                    "role": "other",
                    "ci_low": float(low),
                    "ci_high": float(high),
                    "se": float(se),
                    "n_resamples": int(valid),
                    "start_reached": level.start_reached,
                }
                if training == "sft-rl":
                    needed = seeds.runs_needed[at]
                    row |= {
                        "mean": float(seeds.difference[at]),
                        "p_runs": float(p_runs[at]),
                        "seed_ci_low": or_none(seeds.ci_low[at]),
                        "seed_ci_high": or_none(seeds.ci_high[at]),
                        "seed_se": float(seeds.se[at]),
                        "seed_df": or_none(seeds.df[at]),
                        "p_value": or_none(seeds.p[at]),
                        "mde": or_none(seeds.mde[at]),
                        "runs_needed": int(needed) if np.isfinite(needed) else None,
                    }
                else:
                    row["mean"] = float(level.mean[training][at])
                    if chance is not None and chance in inputs.layout.slices:
                        row["chance"] = or_none(level.mean[training][inputs.layout.slices[chance].start])
                rows.append(row)
        heads += _dcv_heads(cfg, inputs, level, bounds["sft-rl"])
    return assign_roles(cfg, rows, alpha), heads


def stated_levels(rows: Sequence[dict]) -> dict[str, float]:
    """Per axis, the level the answer states: the highest level both methods reach with enough runs."""
    out: dict[str, float] = {}
    for row in rows:
        if row["status"] != "insufficient runs":
            axis = row["matched_by"]
            out[axis] = max(out.get(axis, row["matched_at"]), row["matched_at"])
    return out


def assign_roles(cfg: ExperimentConfig, rows: list[dict], alpha: float, n_pairs: int = 1) -> list[dict]:
    """Mark the primary endpoint (``analysis.primary``) and the secondary family (the other answer
    metrics at each axis's stated level), Holm-adjust the family's p-values (across seeds and these
    runs alike) and give both levels' verdicts; every other row keeps role "other" and no verdict.
    ``n_pairs``: the method pairs compared at once (``dcv.analysis.pairs``); each adjusted p is then
    Bonferroni-multiplied by it, so each family holds its error rate across the pairs (1: the headline)."""
    primary = cfg.analysis.primary
    levels = stated_levels(rows)
    primary_level = primary.level if primary.level is not None else levels.get(primary.axis)
    family = []
    for row in rows:
        if row.get("training") != "sft-rl" or row["status"] == "insufficient runs":
            continue
        at_primary = row["matched_by"] == primary.axis and row["matched_at"] == primary_level
        if at_primary and row["metric"] == primary.metric:
            row["role"] = "primary"
        elif row["metric"] in ANSWER_METRICS and levels.get(row["matched_by"]) == row["matched_at"]:
            row["role"] = "secondary"
            family.append(row)
    seeds = holm([1.0 if r["p_value"] is None else r["p_value"] for r in family])
    runs = holm([r["p_runs"] for r in family])
    for row, p_seeds, p_runs in zip(family, seeds, runs, strict=True):
        row["p_adjusted"] = bonferroni(p_seeds, n_pairs)
        _verdicts(row, row["p_adjusted"], bonferroni(p_runs, n_pairs), alpha)
    for row in rows:
        if row.get("role") == "primary":
            p_seeds = None if row["p_value"] is None else bonferroni(row["p_value"], n_pairs)
            row["p_adjusted"] = p_seeds
            _verdicts(row, 1.0 if p_seeds is None else p_seeds, bonferroni(row["p_runs"], n_pairs), alpha)
    return rows


def _verdicts(row: dict, p_seeds: float, p_runs: float, alpha: float) -> None:
    direction = HIGHER if row["mean"] > 0 else LOWER
    if row["status"] == "no variation":
        row["verdict_runs"] = row["verdict_seeds"] = "no variation"
        return
    row["verdict_runs"] = direction if p_runs < alpha else UNRESOLVED
    row["verdict_seeds"] = direction if p_seeds < alpha else UNRESOLVED


def _dcv_heads(cfg: ExperimentConfig, inputs: Inputs, level, bounds) -> list[pl.DataFrame]:
    """DCV_h = v_h(SFT) - v_h(RL) of every base-circuit head at one used level, with its CI."""
    frames = []
    base = inputs.points[(BASE_MODEL, 0)]
    low, high, _, _ = bounds
    for ref in inputs.refs:
        if not ref.circuit.size:
            continue
        span = inputs.layout.slices[f"{ref.name}/v"]
        frame = effects_frame(base, ref)
        base_effect = frame["effect"].to_numpy()[ref.circuit]
        n_heads = base.probes[ref.name].delta.shape[0]
        n_per_layer = n_heads // inputs.n_layers
        dcv = level.mean["sft"][span] - level.mean["rl"][span]
        frames.append(
            pl.DataFrame(
                {
                    "probe": ref.name,
                    "patching": inputs.method,
                    "by": level.axis,
                    "value": level.value,
                    "layer": (ref.circuit // n_per_layer).astype(np.int32),
                    "head": (ref.circuit % n_per_layer).astype(np.int32),
                    "base_effect": base_effect,
                    "dcv": dcv,
                    "ci_low": low[span],
                    "ci_high": high[span],
                    "n_sft": level.n_runs["sft"],
                    "n_rl": level.n_runs["rl"],
                    "in_means": ref.in_means,
                }
            )
            .with_columns(
                # DCV_h |e_h(base)| = e_h(RL) - e_h(SFT) in the base direction: for masks the seed paper's
                # m_h(RL) - m_h(SFT).
                (pl.col("dcv") * pl.col("base_effect").abs()).alias("effect_gap")
            )
            .with_columns((pl.col("effect_gap") > cfg.circuits.mask.weakened_delta).alias("sft_weakened"))
        )
    return frames


def build(a: Analysis) -> dict[str, pl.DataFrame]:
    return {
        "headline": pl.DataFrame(a.headline, schema=HEADLINE_SCHEMA),
        "dcv_heads": pl.concat(a.dcv_heads) if a.dcv_heads else pl.DataFrame(),
    }


def grid_section(page: Page) -> list[Block]:
    """Every level of the matched grid with the runs of each method that reach it."""
    return [
        ("h2", "Matched grid: runs of each method at every level"),
        ("table", level_table(page.tables["headline"], page.primary)),
    ]


def top_heads_section(page: Page) -> list[Block]:
    """The five heads of largest |DCV| per probe and patching method, at the heatmaps' matching point."""
    dcv_heads = page.tables["dcv_heads"]
    if dcv_heads.is_empty():
        return []
    points = [dcv_point(rows) for _, rows in dcv_heads.group_by("probe", "patching")]
    top = (
        pl.concat(points)
        .sort(pl.col("dcv").abs(), descending=True)
        .group_by("probe", "patching", maintain_order=True)
        .head(5)
        .sort("probe", "patching")
    )
    return [("h2", "Heads with the largest |DCV| (the heatmaps' matching point)"), ("table", top)]


def level_table(headline: pl.DataFrame, patching: str) -> pl.DataFrame:
    """Every level of the matched grid: how many runs of each method reach it and whether it is used."""
    return (
        headline.filter(pl.col("patching") == patching)
        .group_by("matched_by", "matched_at", maintain_order=True)
        .agg(
            pl.col("n_runs_sft").first(),
            pl.col("n_runs_rl").first(),
            (pl.col("status") == "insufficient runs").all().alias("insufficient runs"),
        )
    )


def dcv_point(rows: pl.DataFrame) -> pl.DataFrame:
    """One matching point's DCV rows: the highest matched accuracy both methods reach with enough runs,
    else the last matched step."""
    for by in ("accuracy", "step", "kl"):
        point = rows.filter(pl.col("by") == by)
        if not point.is_empty():
            return point.filter(pl.col("value") == point["value"].max())
    return rows
