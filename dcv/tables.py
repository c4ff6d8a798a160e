"""The schemas of the tables the circuit stages store, and readers of their rows.

Pure (polars only): the analysis, the report and the tests name these columns without importing torch,
Ray or the stage that writes them (``dcv.circuits.pipeline`` writes effects, ``dcv.circuits.model_circuits``
circuits).
"""

from __future__ import annotations

import polars as pl

from dcv.storage import BASE_MODEL

Head = tuple[int, int]  # (layer, head within the layer)

# The head-effect table of one patching run: one row per (model, probe, method, layer, head).
EFFECT_SCHEMA = {
    "model": pl.String,
    "probe": pl.String,
    "method": pl.String,
    "layer": pl.Int32,
    "head": pl.Int32,
    "effect": pl.Float64,  # e_h = mean_i(LD_clean - LD_patched) / mean_i(LD_clean - LD_corrupt)
    "n_items": pl.Int32,
}
# The patching stage's table (``<storage>/patching/effects.parquet``): every model's effects.
EFFECTS_SCHEMA = {
    **EFFECT_SCHEMA,
    "trial": pl.String,
    "step": pl.Int64,
    "checkpoint": pl.String,
    # Per-item parts of the effect (effect = mean(item_delta) / mean(item_denominator)), so the analysis
    # can bootstrap over probe items without patching again.
    "item_delta": pl.List(pl.Float64),
    "item_denominator": pl.List(pl.Float64),
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
