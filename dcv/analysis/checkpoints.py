"""The per-checkpoint tables: ``base_circuits`` (with the competence guard), ``checkpoints`` (one row per
trial, step, probe and patching method: CHECKPOINTS_SCHEMA, joins of the results rows, the probes and the
checkpoints' numbers; its metric columns from ``dcv.metrics``), ``summary`` (means over probes;
SUMMARY_COLUMNS), ``benchmarks`` and ``after_sft``; their report sections (base circuits, benchmarks, GRPO
after SFT, and every checkpoint at the report's end).
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from dcv.analysis.inputs import TARGET_PROBE, Analysis, Inputs, chance_levels, effects_frame, or_none
from dcv.analysis.section import Block, Page
from dcv.circuits.competence import Competence
from dcv.circuits.vulnerability import effect_spearman
from dcv.config import ExperimentConfig
from dcv.matched import checkpoint_numbers
from dcv.metrics import HEADLINE_METRICS, METRICS, with_chance
from dcv.storage import BASE_MODEL

NOISE_FLOOR_COLUMNS = ("noise_floor_preservation", "noise_floor_jaccard", "noise_floor_vulnerability")
# The summary table's column order; a metric of ``dcv.metrics`` not named here follows.
SUMMARY_KEYS = ("trial", "training", "init", "learning_rate", "seed", "step", "model", "patching")
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


# The checkpoints table: one row per (trial, step, probe, patching method), these columns in this order;
# a metric of ``dcv.metrics`` not named here follows them (Float64).
CHECKPOINTS_SCHEMA = {
    "trial": pl.String,
    "training": pl.String,  # the results table's method (in the analysis' slots: sft | rl)
    "init": pl.String,
    "learning_rate": pl.Float64,
    "seed": pl.Int64,
    "step": pl.Int64,
    "model": pl.String,
    "target_accuracy": pl.Float64,
    "kl_to_base": pl.Float64,
    "probe": pl.String,
    "patching": pl.String,
    # ok | lost | below tau (circuit did not reach tau) | target probe | not competent | empty circuit
    "status": pl.String,
    "in_means": pl.Boolean,
    "in_forgetting": pl.Boolean,
    "probe_accuracy": pl.Float64,
    "probe_mean_ld": pl.Float64,
    "forgetting": pl.Float64,
    "forgetting_ld": pl.Float64,
    "forgetting_bench": pl.Float64,
    "weight_change": pl.Float64,
    "cmap": pl.Float64,
    "gap": pl.Float64,
    "base_gap": pl.Float64,  # masks: the real gap their lost rule reads (``_mask_gaps``), as ``gap`` is
    "lost": pl.Boolean,
    "circuit_size": pl.Int64,
    "faithfulness": pl.Float64,  # the checkpoint's own circuit's F (null where lost)
    "preservation": pl.Float64,
    "jaccard": pl.Float64,
    "preservation_chance": pl.Float64,  # E[P] and E[J] of a random head set of the checkpoint's circuit size
    "jaccard_chance": pl.Float64,
    "effect_spearman": pl.Float64,  # all heads' effects against the base's (null where lost)
    "base_circuit_faithfulness": pl.Float64,
    "circuit_vulnerability": pl.Float64,
    "circuit_vulnerability_abs": pl.Float64,
    "noise_floor_preservation": pl.Float64,
    "noise_floor_jaccard": pl.Float64,
    "noise_floor_vulnerability": pl.Float64,
    "within_noise_floor": pl.Boolean,
    "preservation_above_chance": pl.Float64,
    "jaccard_above_chance": pl.Float64,
}


def checkpoint_table(
    cfg: ExperimentConfig, inputs: Sequence[Inputs], circuits: pl.DataFrame, noise_floor: pl.DataFrame
) -> pl.DataFrame:
    """CHECKPOINTS_SCHEMA: each results row (``_run_rows``) joined with its method's probes
    (``_probe_rows``: the competence guard, the base circuit, the noise floor), the checkpoint's numbers
    per probe (``_number_rows``) and its own circuit; then the status and the lost rule's nulls."""
    if not inputs:
        return pl.DataFrame(schema=CHECKPOINTS_SCHEMA)
    keys = ["patching", "model", "step", "probe"]
    own = circuits.select(
        "model",
        "probe",
        pl.col("method").alias("patching"),
        pl.col("size").cast(pl.Int64).alias("circuit_size"),
        "faithfulness",
        "base_circuit_faithfulness",
    )
    table = (
        _run_rows(inputs[0].rows)
        .join(_probe_rows(inputs, noise_floor), how="cross")
        .join(_number_rows(inputs, own), on=keys, how="left")
        .join(own, on=["model", "probe", "patching"], how="left")
        .with_columns(_status().alias("status"), *_lost_rule())
    )
    metric_columns = [m.name for m in METRICS.values() if m.name in table.columns]
    columns = [*CHECKPOINTS_SCHEMA, *(c for c in metric_columns if c not in CHECKPOINTS_SCHEMA)]
    schema = {c: CHECKPOINTS_SCHEMA.get(c, pl.Float64) for c in columns}
    return (
        table.with_columns(
            # Not distinguishable from base: the model keeps as much of the base circuit as the base keeps of
            # itself on a resample of its own items (the noise floor's 5th percentile).
            (pl.col("preservation") >= pl.col("noise_floor_preservation")).alias("within_noise_floor"),
            *_above_chance(),
        )
        .select([pl.col(c).cast(t) for c, t in schema.items()])
        .sort("trial", "step", "probe", "patching")
    )


def _run_rows(rows: Sequence[dict]) -> pl.DataFrame:
    """The results rows (every method's inputs hold the same): what names each checkpoint."""
    return pl.DataFrame(
        [
            {
                "trial": row["trial"],
                "training": row["method"],
                "init": row["init"],
                "learning_rate": row["learning_rate"],
                "seed": row["seed"],
                "step": row["step"],
                "model": row["model"],
                "target_accuracy": row["target/accuracy"],
                "kl_to_base": row.get("kl_to_base") or 0.0,
            }
            for row in rows
        ],
        infer_schema_length=None,
    )


def _probe_rows(inputs: Sequence[Inputs], noise_floor: pl.DataFrame) -> pl.DataFrame:
    """Per (patching method, probe): the competence guard, the base circuit and its noise floor."""
    rows = [
        {
            "patching": data.method,
            "probe": ref.name,
            "in_means": ref.in_means,
            "in_forgetting": ref.in_forgetting,
            "competent": data.competence[ref.name].competent,
            "has_circuit": bool(ref.circuit.size),
            "reached_tau": bool(data.circuits[ref.name]["reached_tau"]),
            "base_gap": data.competence[ref.name].gap if ref.base.gap is None else ref.base.gap,
        }
        for data in inputs
        for ref in data.refs
    ]
    floor = noise_floor.filter(pl.col("kind") == "bootstrap").select(
        "probe",
        pl.col("method").alias("patching"),
        pl.col("preservation").alias("noise_floor_preservation"),
        pl.col("jaccard").alias("noise_floor_jaccard"),
        pl.col("circuit_vulnerability").alias("noise_floor_vulnerability"),
    )
    probes = pl.DataFrame(rows, schema_overrides={"base_gap": pl.Float64}, infer_schema_length=None)
    return probes.join(floor, on=["probe", "patching"], how="left")


def _number_rows(inputs: Sequence[Inputs], own: pl.DataFrame) -> pl.DataFrame:
    """Per (patching method, model, step, probe): the probe's numbers over all items (the checkpoint
    vector's), the model's fixed numbers, the effect Spearman and the chance levels of P and J."""
    sizes = {
        (m, p, k): n for m, p, k, n in own.select("model", "probe", "patching", "circuit_size").iter_rows()
    }
    per_probe = [
        m.name for m in METRICS.values() if m.per == "probe" and m.source == "parts" and not m.counts
    ]
    per_model = [m.name for m in METRICS.values() if m.per == "model" and m.source == "fixed"]
    rows = []
    for data in inputs:
        base = data.points[(BASE_MODEL, 0)]
        base_effects = {ref.name: effects_frame(base, ref) for ref in data.refs}
        for (model, step), point in data.points.items():
            vector = checkpoint_numbers(point, data.refs, data.layout)
            for ref in data.refs:

                def get(name: str, ref=ref, vector=vector, layout=data.layout) -> float:
                    return float(layout.scalar(vector, f"{ref.name}/{name}"))

                lost = bool(get("lost"))
                chance = chance_levels(ref, sizes[(model, ref.name, data.method)])
                rows.append(
                    {
                        "patching": data.method,
                        "model": model,
                        "step": step,
                        "probe": ref.name,
                        "lost": lost,
                        **{c: get(c) for c in ("probe_accuracy", "probe_mean_ld", "gap", *per_probe)},
                        **{c: or_none(point.fixed[c]) for c in per_model},
                        # Per-probe values of fixed metrics (``Point.fixed`` holds their means over probes).
                        "preservation_chance": chance[0],
                        "jaccard_chance": chance[1],
                        "effect_spearman": None
                        if lost
                        else effect_spearman(base_effects[ref.name], effects_frame(point, ref)),
                    }
                )
    nullable = ["preservation_chance", "jaccard_chance", "effect_spearman", *per_model]
    return pl.DataFrame(rows, schema_overrides=dict.fromkeys(nullable, pl.Float64), infer_schema_length=None)


def _status() -> pl.Expr:
    """What a checkpoint's row for a probe holds: ok, lost, or why the probe is not in the means."""
    return (
        pl.when(~pl.col("competent"))
        .then(pl.lit("not competent"))
        .when(~pl.col("has_circuit"))
        .then(pl.lit("empty circuit"))
        .when(pl.col("lost"))
        .then(pl.lit("lost"))
        .when(pl.col("probe") == TARGET_PROBE)
        .then(pl.lit("target probe"))
        .when(pl.col("reached_tau"))
        .then(pl.lit("ok"))
        .otherwise(pl.lit("below tau"))
    )


def _lost_rule() -> list[pl.Expr]:
    """Null where a number is not one (docs/method.md "Competence guard and the lost rule"): every
    metric's by its record (``Metric.lost_null``, ``needs_circuit``), the own circuit's F where lost."""
    out = [pl.when(~pl.col("lost")).then(pl.col("faithfulness")).alias("faithfulness")]
    for m in METRICS.values():
        if m.per == "model" or m.counts or not (m.lost_null or m.needs_circuit):
            continue
        null = pl.lit(False)
        if m.lost_null:
            null = null | pl.col("lost")
        if m.needs_circuit:
            null = null | ~pl.col("has_circuit")
        out.append(pl.when(~null).then(pl.col(m.name)).alias(m.name))
    return out


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


def base_circuits_section(page: Page) -> list[Block]:
    return [("h2", "Base circuits and the competence guard"), ("table", page.tables["base_circuits"])]


def benchmarks_section(page: Page) -> list[Block]:
    """The lm-eval scores, where a benchmark ran (the table's first four columns are its keys)."""
    if len(page.tables["benchmarks"].columns) <= 4:
        return []
    return [("h2", "Standard benchmarks (lm-eval) of every checkpoint"), ("table", page.tables["benchmarks"])]


def after_sft_section(page: Page) -> list[Block]:
    if page.tables["after_sft"].is_empty():
        return []
    return [
        ("h2", "GRPO after SFT against its SFT start point"),
        ("p", "restores_circuit: preservation above the SFT checkpoint it started from."),
        ("table", page.tables["after_sft"]),
    ]


def every_checkpoint_section(page: Page) -> list[Block]:
    """Every checkpoint's means over probes, then every fine-tuned checkpoint per probe."""
    per_step = page.tables["summary"].select(
        "trial", "step", "patching", *with_chance(HEADLINE_METRICS), "noise_floor_preservation"
    )
    circuit = [m.name for m in METRICS.values() if m.source == "parts" and m.circuit]  # P, J, V, V abs
    per_probe = (
        page.tables["checkpoints"]
        .filter(pl.col("step") > 0)
        .select(
            "trial",
            "step",
            "patching",
            "probe",
            "status",
            "probe_accuracy",
            "gap",
            "base_gap",
            *with_chance(circuit),
        )
    )
    return [
        ("h2", "Every checkpoint (means over probes in means; lost probes counted)"),
        ("p", "*_chance: what a random head set of the checkpoint's circuit size would score by chance."),
        ("table", per_step),
        ("h2", "Every fine-tuned checkpoint per probe (status: ok, lost, below tau, ...)"),
        ("table", per_probe),
    ]
