"""The ``weight_change_heads`` table and each model's per-head weight change."""

from __future__ import annotations

import numpy as np
import polars as pl

from dcv.analysis.inputs import Analysis


def head_changes(weight_change: pl.DataFrame | None) -> dict[str, np.ndarray]:
    """Per model of the weight-change stage's table, every head's ``change`` in (layer, head) order."""
    if weight_change is None or weight_change.is_empty():
        return {}
    ordered = weight_change.sort("model", "layer", "head")
    return {m: frame["change"].to_numpy() for (m,), frame in ordered.group_by("model", maintain_order=True)}


WEIGHT_CHANGE_HEADS_SCHEMA = {
    "training": pl.String,
    "step": pl.Int64,
    "layer": pl.Int32,
    "head": pl.Int32,
    "kv_shared_by": pl.Int32,
    "q_change": pl.Float64,
    "k_change": pl.Float64,
    "v_change": pl.Float64,
    "o_change": pl.Float64,
    "change": pl.Float64,
    "changed_share": pl.Float64,
    "n_runs": pl.Int64,
}


def weight_change_heads(weight_change: pl.DataFrame | None) -> pl.DataFrame:
    """Per training method, step and head: the means over runs of the weight-change stage's numbers."""
    if weight_change is None or weight_change.is_empty():
        return pl.DataFrame(schema=WEIGHT_CHANGE_HEADS_SCHEMA)
    numbers = ("q_change", "k_change", "v_change", "o_change", "change", "changed_share")
    return (
        weight_change.rename({"method": "training"})
        .group_by("training", "step", "layer", "head")
        .agg(
            pl.col("kv_shared_by").first(),
            *[pl.col(c).mean() for c in numbers],
            pl.col("trial").n_unique().cast(pl.Int64).alias("n_runs"),
        )
        .select(list(WEIGHT_CHANGE_HEADS_SCHEMA))
        .sort("training", "step", "layer", "head")
    )


def build(a: Analysis) -> dict[str, pl.DataFrame]:
    return {"weight_change_heads": weight_change_heads(a.weight_change)}
