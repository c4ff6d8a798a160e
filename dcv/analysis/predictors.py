"""What relates to forgetting: ``correlations`` (Spearman of V with forgetting), and each patching
method's ``predictors`` and ``weight_vs_function`` tables (``dcv.predictors``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from dcv.analysis.inputs import Analysis, Inputs, point_numbers
from dcv.config import ExperimentConfig
from dcv.matched import TRAINING_METHODS, Run, checkpoint_numbers
from dcv.predictors import (
    PREDICTORS_SCHEMA,
    WEIGHT_FUNCTION_SCHEMA,
    predictor_table,
    spearman,
    weight_function_table,
)


def correlation_table(checkpoints: pl.DataFrame, summary: pl.DataFrame) -> pl.DataFrame:
    """Spearman of V(M) with forgetting over fine-tuned checkpoints (step > 0), probes in means."""
    tuned_probes = checkpoints.filter((pl.col("step") > 0) & pl.col("in_means"))
    tuned_mean = summary.filter(pl.col("step") > 0).with_columns(pl.lit("mean").alias("probe"))
    rows = []
    for frame in (tuned_probes, tuned_mean):
        for (probe, patching), group in frame.group_by("probe", "patching", maintain_order=True):
            for training in (*TRAINING_METHODS, "pooled"):
                rows_of = group if training == "pooled" else group.filter(pl.col("training") == training)
                v = rows_of["circuit_vulnerability"].cast(pl.Float64).fill_null(np.nan).to_numpy()
                rows.append(
                    {
                        "probe": probe,
                        "patching": patching,
                        "training": training,
                        "n_checkpoints": rows_of.height,
                        "spearman_forgetting": spearman(v, rows_of["forgetting"].to_numpy()),
                        "spearman_forgetting_ld": spearman(v, rows_of["forgetting_ld"].to_numpy()),
                    }
                )
    schema = {
        "probe": pl.String,
        "patching": pl.String,
        "training": pl.String,
        "n_checkpoints": pl.Int64,
        "spearman_forgetting": pl.Float64,
        "spearman_forgetting_ld": pl.Float64,
    }
    return pl.DataFrame(rows, schema=schema).sort("probe", "patching", "training")


def method_tables(
    cfg: ExperimentConfig, data: Inputs, runs: Sequence[Run], draws: Sequence, changes: dict[str, np.ndarray]
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(predictors, weight_vs_function) of one patching method, from the matched comparison's draws."""
    observed = {
        r.name: np.stack([checkpoint_numbers(p, data.refs, data.layout) for p in r.points]) for r in runs
    }
    a, level = cfg.analysis, cfg.circuits.ci_level
    predictors = predictor_table(
        data.method,
        runs,
        observed,
        data.layout,
        draws,
        a.predictors,
        level,
        refs=data.refs,
        item_split=a.predictor_item_split,
    )
    tuned = [
        (row["method"], row["trial"], row["step"], row["model"], point_numbers(data, row))
        for row in data.rows
        if row["step"] > 0
    ]
    return predictors, weight_function_table(data.method, tuned, data.refs, data.layout, changes)


def build(a: Analysis) -> dict[str, pl.DataFrame]:
    return {
        "correlations": correlation_table(a.checkpoints, a.summary),
        "predictors": pl.concat(a.predictors) if a.predictors else pl.DataFrame(schema=PREDICTORS_SCHEMA),
        "weight_vs_function": pl.concat(a.weight_vs_function)
        if a.weight_vs_function
        else pl.DataFrame(schema=WEIGHT_FUNCTION_SCHEMA),
    }
