"""The schemas of the tables the circuit stages store, and readers of their rows.

Pure (polars only): the analysis, the report and the tests name these columns without importing torch,
Ray or the stage that writes them (``dcv.circuits.pipeline`` writes effects and cmap,
``dcv.circuits.model_circuits`` circuits).
"""

from __future__ import annotations

import polars as pl

from dcv.storage import BASE_MODEL

Head = tuple[int, int]  # (layer, head within the layer)

# The head effects of one (model, probe, method), in memory, as ``dcv.circuits.patching.effects_table`` and
# ``mask.mask_effects`` return them: one row per (layer, head). Never stored as is: the patching stage
# (``dcv.circuits.pipeline.item_rows``) adds the checkpoint and per-item columns of EFFECTS_SCHEMA.
HEAD_EFFECTS_SCHEMA = {
    "model": pl.String,
    "probe": pl.String,
    "method": pl.String,
    "layer": pl.Int32,
    "head": pl.Int32,
    "effect": pl.Float64,  # e_h = mean_i(LD_clean - LD_patched) / mean_i(LD_clean - LD_corrupt)
    "n_items": pl.Int32,
}
# The patching stage's table (``<storage>/patching/effects.parquet``): every model's head effects, with the
# checkpoint they belong to and the per-item parts behind each effect.
EFFECTS_SCHEMA = {
    **HEAD_EFFECTS_SCHEMA,
    "trial": pl.String,
    "step": pl.Int64,
    "checkpoint": pl.String,
    # Per-item parts of the effect (effect = mean(item_delta) / mean(item_denominator)), so the analysis
    # can bootstrap over probe items without patching again.
    "item_delta": pl.List(pl.Float64),
    "item_denominator": pl.List(pl.Float64),
}
# The cross-model patching table (``<storage>/patching/cmap.parquet``, method ``cmap``): one row per
# (checkpoint, probe, direction, layer, head). ``effect`` is cmap_h = mean_i(delta) / mean_i(denominator):
# item_delta is LD_target - LD_(target with h's output from the other model's clean run; a head's output is
# its z times its own model's o_proj columns, swapped at hook_attn_out), item_denominator the base's gap
# LD_base_clean - LD_base_corrupt, in both directions. ``trial``/``step``/``checkpoint``
# name the checkpoint (the base model has no rows: its cmap with itself is 0 by construction).
CMAP_SCHEMA = {
    **EFFECTS_SCHEMA,
    "direction": pl.String,  # ckpt_into_base | base_into_ckpt (dcv.config.CMAP_DIRECTIONS)
}
# The circuits stage's table (``<storage>/circuits/circuits.parquet``): one row per (model, probe, method).
CIRCUITS_SCHEMA = {
    "model": pl.String,
    "trial": pl.String,
    "step": pl.Int64,
    "probe": pl.String,
    "method": pl.String,  # patching method whose effects ranked the heads
    "size": pl.Int32,
    "faithfulness": pl.Float64,  # F(C_T(M), M)
    "reached_tau": pl.Boolean,
    "base_circuit_faithfulness": pl.Float64,  # F(C_T(base), M)
    "layers": pl.List(pl.Int32),  # the circuit's heads, largest |effect| first
    "heads": pl.List(pl.Int32),
    # The faithfulness curve (dcv.circuits.curves): F(top-k of the base ranking, M) at each fraction of
    # circuits.curve_fractions; empty lists for a method that ranks no heads (mask) or curves off. (cmap finds
    # no circuit and has no rows here.)
    "curve_fractions": pl.List(pl.Float64),
    "curve_k": pl.List(pl.Int32),
    "curve_faithfulness": pl.List(pl.Float64),
}
# ``<storage>/circuits/faithfulness_curves.parquet``: the circuits table's curves, one row per point.
FAITHFULNESS_CURVES_SCHEMA = {
    "model": pl.String,
    "trial": pl.String,
    "step": pl.Int64,
    "method": pl.String,
    "probe": pl.String,
    "fraction": pl.Float64,  # of all heads
    "k": pl.Int32,  # ceil(fraction * heads): the base ranking's top k
    "faithfulness": pl.Float64,  # F(C_k(base), M)
}


def circuit_heads(row: dict) -> list[Head]:
    """A CIRCUITS_SCHEMA row's heads as (layer, head), largest |effect| first."""
    return list(zip(row["layers"], row["heads"], strict=True))


def base_circuits(table: pl.DataFrame) -> dict[tuple[str, str], list[Head]]:
    """{(probe, method): base circuit heads} from a CIRCUITS_SCHEMA table."""
    return {
        (row["probe"], row["method"]): circuit_heads(row)
        for row in table.filter(pl.col("model") == BASE_MODEL).iter_rows(named=True)
    }


def faithfulness_curves(circuits: pl.DataFrame) -> pl.DataFrame:
    """FAITHFULNESS_CURVES_SCHEMA rows from a CIRCUITS_SCHEMA table (none from a table stored before the
    curves existed)."""
    if "curve_k" not in circuits.columns:
        return pl.DataFrame(schema=FAITHFULNESS_CURVES_SCHEMA)
    curves = circuits.filter(pl.col("curve_k").list.len() > 0).select(
        "model",
        "trial",
        "step",
        "method",
        "probe",
        pl.col("curve_fractions").alias("fraction"),
        pl.col("curve_k").alias("k"),
        pl.col("curve_faithfulness").alias("faithfulness"),
    )
    return (
        curves.explode("fraction", "k", "faithfulness")
        .cast(FAITHFULNESS_CURVES_SCHEMA)
        .sort("model", "method", "probe", "fraction")
    )
