"""The per-checkpoint tables: ``base_circuits`` (with the competence guard), ``checkpoints`` (one row per
trial, step, probe and patching method; columns CHECKPOINT_COLUMNS, its metric columns from
``dcv.metrics``), ``summary`` (means over probes; SUMMARY_COLUMNS), ``benchmarks`` and ``after_sft``.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from dcv.analysis.inputs import TARGET_PROBE, Analysis, Inputs, chance_levels, effects_frame, or_none
from dcv.circuits.competence import Competence
from dcv.circuits.vulnerability import effect_spearman
from dcv.config import ExperimentConfig
from dcv.matched import (
    Point,
    ProbeReference,
    checkpoint_numbers,
)
from dcv.metrics import METRICS, NULLABLE_METRICS
from dcv.storage import BASE_MODEL

NOISE_FLOOR_COLUMNS = ("noise_floor_preservation", "noise_floor_jaccard", "noise_floor_vulnerability")
# Float columns of the checkpoints table that can be null: the metrics' (``dcv.metrics``), the noise floor's,
# and the own circuit's F and the effect Spearman (null where the checkpoint lost the probe).
NULLABLE = (*NOISE_FLOOR_COLUMNS, *NULLABLE_METRICS, "faithfulness", "effect_spearman")
# What names a checkpoint in the checkpoints and summary tables.
CHECKPOINT_KEYS = ("trial", "training", "init", "learning_rate", "seed", "step", "model")
# The checkpoints and summary tables' column order; a metric of ``dcv.metrics`` not named here follows.
CHECKPOINT_COLUMNS = (
    *CHECKPOINT_KEYS,
    "target_accuracy",
    "kl_to_base",
    "probe",
    "patching",
    "status",
    "in_means",
    "in_forgetting",
    "probe_accuracy",
    "probe_mean_ld",
    "forgetting",
    "forgetting_ld",
    "forgetting_bench",
    "weight_change",
    "cmap",
    "gap",
    "base_gap",  # masks: the real gap their lost rule reads (``_mask_gaps``), as ``gap`` is
    "lost",
    "circuit_size",
    "faithfulness",
    "preservation",
    "jaccard",
    "preservation_chance",  # E[P] and E[J] of a random head set of the checkpoint's circuit size
    "jaccard_chance",
    "effect_spearman",
    "base_circuit_faithfulness",
    "circuit_vulnerability",
    "circuit_vulnerability_abs",
    *NOISE_FLOOR_COLUMNS,
    "within_noise_floor",
    "preservation_above_chance",
    "jaccard_above_chance",
)
SUMMARY_KEYS = (*CHECKPOINT_KEYS, "patching")
SUMMARY_COLUMNS = (
    *SUMMARY_KEYS,
    "target_accuracy",
    "kl_to_base",
    "forgetting_bench",
    "weight_change",
    "cmap",
    "forgetting",
    "forgetting_ld",
    "n_lost",
    "n_probes_forgetting",
    "preservation",
    "jaccard",
    "preservation_chance",
    "jaccard_chance",
    "base_circuit_faithfulness",
    "circuit_vulnerability",
    "circuit_vulnerability_abs",
    "circuit_size",
    "faithfulness",
    *NOISE_FLOOR_COLUMNS,
    "n_probes_circuits",
    "preservation_above_chance",
    "jaccard_above_chance",
)


def base_circuit_table(circuits: pl.DataFrame, shape: tuple[int, int], inputs: Sequence) -> pl.DataFrame:
    """The base circuits with the competence guard; ``shape`` is the model's (layers, heads per layer)."""
    guard = [
        {
            "probe": ref.name,
            "method": data.method,
            "base_accuracy": data.competence[ref.name].accuracy,
            "base_gap": data.competence[ref.name].gap,
            "gap_ci_low": data.competence[ref.name].gap_ci_low,
            "gap_ci_high": data.competence[ref.name].gap_ci_high,
            "n_items": data.competence[ref.name].n_items,
            "competent": data.competence[ref.name].competent,
            "in_means": ref.in_means,
            "excluded_because": _excluded_because(ref, data.competence[ref.name], data.circuits[ref.name]),
        }
        for data in inputs
        for ref in data.refs
    ]
    base = circuits.filter(pl.col("model") == BASE_MODEL).join(
        pl.DataFrame(guard), on=["probe", "method"], how="left"
    )
    return base.select(
        "probe",
        "method",
        "size",
        pl.lit(shape[0] * shape[1], pl.Int32).alias("n_heads_total"),
        pl.lit(shape[0], pl.Int32).alias("n_layers"),
        pl.lit(shape[1], pl.Int32).alias("heads_per_layer"),
        "faithfulness",
        "reached_tau",
        pl.struct("layers", "heads")
        .map_elements(
            lambda r: " ".join(f"{la}.{h}" for la, h in zip(r["layers"], r["heads"], strict=True)),
            return_dtype=pl.String,
        )
        .alias("circuit"),
        "base_accuracy",
        "base_gap",
        "gap_ci_low",
        "gap_ci_high",
        "n_items",
        "competent",
        "in_means",
        "excluded_because",
    ).sort("probe", "method")


def _excluded_because(ref, competence: Competence, circuit: dict) -> str:
    """Why a probe is left out of the means over prior capabilities ("" when it is in them)."""
    if not competence.competent:
        return f"the base model cannot do it: {competence.reason}"
    if not ref.circuit.size:
        return "empty base circuit"
    if ref.name == TARGET_PROBE:
        return "the target task's own probe (reported on its own)"
    if not circuit["reached_tau"]:
        return f"its circuit did not reach tau (faithfulness {circuit['faithfulness']:.3g})"
    return ""


def probe_status(ref: ProbeReference, competence: Competence, circuit: dict, lost: bool) -> str:
    """What a checkpoint's row for a probe holds: ok, lost, or why the probe is not in the means."""
    if not competence.competent:
        return "not competent"
    if not ref.circuit.size:
        return "empty circuit"
    if lost:
        return "lost"
    if ref.name == TARGET_PROBE:
        return "target probe"
    return "ok" if circuit["reached_tau"] else "below tau"


def checkpoint_table(
    cfg: ExperimentConfig, inputs: Sequence[Inputs], circuits: pl.DataFrame, noise_floor: pl.DataFrame
) -> pl.DataFrame:
    """One row per (trial, step, probe, patching method): the probe's numbers over all items."""
    floor = {
        (r["probe"], r["method"]): r
        for r in noise_floor.filter(pl.col("kind") == "bootstrap").iter_rows(named=True)
    }
    own = {(r["model"], r["probe"], r["method"]): r for r in circuits.iter_rows(named=True)}
    base_effects = {}
    rows = []
    for data in inputs:
        numbers = {k: checkpoint_numbers(p, data.refs, data.layout) for k, p in data.points.items()}
        base = data.points[(BASE_MODEL, 0)]
        for row in data.rows:
            model, point = row["model"], data.points[(row["model"], row["step"])]
            vector = numbers[(model, row["step"])]
            for ref in data.refs:
                key = (model, ref.name, data.method)
                if (ref.name, data.method) not in base_effects:
                    base_effects[(ref.name, data.method)] = effects_frame(base, ref)

                def get(metric: str, ref=ref, vector=vector, layout=data.layout) -> float:
                    return float(layout.scalar(vector, f"{ref.name}/{metric}"))

                lost = bool(get("lost"))
                status = probe_status(ref, data.competence[ref.name], data.circuits[ref.name], lost)
                nf = floor.get((ref.name, data.method), {})
                chance = chance_levels(ref, own[key]["size"])
                # Per-probe values of the fixed metrics (``Point.fixed`` holds their means over probes).
                fixed = {
                    "base_circuit_faithfulness": own[key]["base_circuit_faithfulness"],
                    "preservation_chance": chance[0],
                    "jaccard_chance": chance[1],
                }
                rows.append(
                    {
                        "trial": row["trial"],
                        "training": row["method"],
                        "init": row["init"],
                        "learning_rate": row["learning_rate"],
                        "seed": row["seed"],
                        "step": row["step"],
                        "model": model,
                        "target_accuracy": row["target/accuracy"],
                        "kl_to_base": row.get("kl_to_base") or 0.0,
                        "probe": ref.name,
                        "patching": data.method,
                        "status": status,
                        "in_means": ref.in_means,
                        "in_forgetting": ref.in_forgetting,
                        "probe_accuracy": get("probe_accuracy"),
                        "probe_mean_ld": get("probe_mean_ld"),
                        "gap": get("gap"),
                        "base_gap": data.competence[ref.name].gap if ref.base.gap is None else ref.base.gap,
                        "lost": lost,
                        "circuit_size": own[key]["size"],
                        # Lost is lost everywhere: no number divided by the checkpoint's own (vanished) gap.
                        "faithfulness": None if lost else own[key]["faithfulness"],
                        "effect_spearman": None
                        if lost
                        else effect_spearman(
                            base_effects[(ref.name, data.method)], effects_frame(point, ref)
                        ),
                        "noise_floor_preservation": nf.get("preservation"),
                        "noise_floor_jaccard": nf.get("jaccard"),
                        "noise_floor_vulnerability": nf.get("circuit_vulnerability"),
                        **_metric_cells(point, ref, lost, get, fixed),
                    }
                )
    table = pl.DataFrame(rows, schema_overrides=dict.fromkeys(NULLABLE, pl.Float64), infer_schema_length=None)
    return (
        table.with_columns(
            # Not distinguishable from base: the model keeps as much of the base circuit as the base keeps of
            # itself on a resample of its own items (the noise floor's 5th percentile).
            (pl.col("preservation") >= pl.col("noise_floor_preservation")).alias("within_noise_floor"),
            *_above_chance(),
        )
        .pipe(_ordered, CHECKPOINT_COLUMNS)
        .sort("trial", "step", "probe", "patching")
    )


def _metric_cells(point: Point, ref: ProbeReference, lost: bool, get, fixed: dict) -> dict:
    """A checkpoints row's metric columns (``dcv.metrics``) for one probe: per-probe numbers from its
    parts (``get``) or ``fixed``'s per-probe values, null by each metric's lost rule; per-model numbers
    from the point."""
    cells = {}
    for m in METRICS.values():
        if m.source == "results" or m.counts:
            continue  # the results row's own columns; a count's flag (``lost``) is a column of its own
        if m.per == "model":
            cells[m.name] = or_none(point.fixed[m.name])
        elif (m.lost_null and lost) or (m.needs_circuit and not ref.circuit.size):
            cells[m.name] = None
        else:
            cells[m.name] = get(m.name) if m.source == "parts" else fixed[m.name]
    return cells


def _ordered(frame: pl.DataFrame, columns: Sequence[str]) -> pl.DataFrame:
    """``frame`` with ``columns`` first, in that order, then any other column (a metric not placed)."""
    return frame.select(*columns, *[c for c in frame.columns if c not in columns])


def _above_chance() -> list[pl.Expr]:
    """Each metric with a chance level minus it (P and J; null where either is)."""
    return [
        (pl.col(m.name) - pl.col(m.chance)).alias(f"{m.name}_above_chance")
        for m in METRICS.values()
        if m.chance
    ]


def benchmark_table(results: pl.DataFrame) -> pl.DataFrame:
    """Every checkpoint's lm-eval scores (the results table's ``bench/`` columns)."""
    columns = [c for c in results.columns if c.startswith("bench/")]
    return results.select("trial", "method", "init", "step", *columns).sort("trial", "step")


def summary_table(checkpoints: pl.DataFrame) -> pl.DataFrame:
    """Per checkpoint and patching method, means over the probes in means (competent, circuit reached
    tau, prior capabilities only): lost probes count in ``n_lost`` and in forgetting, not in P, J or V."""
    keys = list(SUMMARY_KEYS)
    first = [m.name for m in METRICS.values() if m.per == "model"]  # one number per checkpoint
    per_probe = [m for m in METRICS.values() if m.per == "probe"]

    def means(circuit: bool) -> list[pl.Expr]:
        return [
            pl.col(m.counts).sum().cast(pl.Int64).alias(m.name) if m.counts else pl.col(m.name).mean()
            for m in per_probe
            if m.circuit == circuit
        ]

    every = checkpoints.group_by(keys, maintain_order=True).agg(*[pl.col(c).first() for c in first])
    forgetting = (
        checkpoints.filter(pl.col("in_forgetting"))
        .group_by(keys, maintain_order=True)
        .agg(*means(circuit=False), pl.len().cast(pl.Int64).alias("n_probes_forgetting"))
    )
    circuit = (
        checkpoints.filter(pl.col("in_means"))
        .group_by(keys, maintain_order=True)
        .agg(
            *means(circuit=True),
            *[pl.col(c).mean() for c in ("circuit_size", "faithfulness", *NOISE_FLOOR_COLUMNS)],
            pl.len().cast(pl.Int64).alias("n_probes_circuits"),
        )
    )
    counts = (*[m.name for m in per_probe if m.counts], "n_probes_forgetting", "n_probes_circuits")
    return (
        every.join(forgetting, on=keys, how="left")
        .join(circuit, on=keys, how="left")
        .with_columns(*[pl.col(c).fill_null(0) for c in counts], *_above_chance())
        .pipe(_ordered, SUMMARY_COLUMNS)
        .sort("trial", "step", "patching")
    )


def after_sft_table(summary: pl.DataFrame) -> pl.DataFrame:
    """GRPO after SFT against the SFT checkpoint it started from (its own step 0): does RL restore the
    base circuits (preservation up, V down) or only stop their loss?"""
    columns = ("target_accuracy", "forgetting", "preservation", "circuit_vulnerability")
    runs = summary.filter(pl.col("init").str.starts_with("sft:"))
    start = runs.filter(pl.col("step") == 0).select(
        "trial", "patching", *[pl.col(c).alias(f"{c}_start") for c in columns]
    )
    return (
        runs.filter(pl.col("step") > 0)
        .join(start, on=["trial", "patching"], how="inner")
        .select(
            "trial",
            "init",
            "step",
            "patching",
            *[x for c in columns for x in (pl.col(f"{c}_start"), pl.col(c))],
            (pl.col("preservation") > pl.col("preservation_start")).alias("restores_circuit"),
        )
        .sort("trial", "step", "patching")
    )


def build(a: Analysis) -> dict[str, pl.DataFrame]:
    return {
        "base_circuits": base_circuit_table(a.circuits, a.shape, a.inputs),
        "checkpoints": a.checkpoints,
        "summary": a.summary,
        "after_sft": after_sft_table(a.summary),
        "benchmarks": benchmark_table(a.results),
    }
