"""The ``noise_floor`` table: the base circuit against itself on resamples of the probe items; its report
section (``section``)."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from dcv.analysis.inputs import Analysis, Inputs
from dcv.analysis.section import Block, Page
from dcv.circuits.methods import patching_method
from dcv.circuits.noise_floor import NOISE_FLOOR_SCHEMA, bootstrap_floor, floor_row
from dcv.config import ExperimentConfig
from dcv.storage import BASE_MODEL


def noise_floor_table(
    cfg: ExperimentConfig, inputs: Sequence[Inputs], stored: pl.DataFrame | None
) -> pl.DataFrame:
    """The patching methods' floor from the base model's per-item parts, beside the masks' stored rows."""
    rows = []
    for data in inputs:
        if not patching_method(data.method).item_parts or not cfg.circuits.noise_floor:
            continue
        base = data.points[(BASE_MODEL, 0)]
        for ref in data.refs:
            if not ref.circuit.size:
                continue
            parts = base.probes[ref.name]
            draws = bootstrap_floor(
                parts.delta, parts.denominator, ref.circuit, cfg.circuits.noise_floor_resamples, seed=0
            )
            rows.append(
                floor_row(ref.name, data.method, "bootstrap", parts.delta.shape[1], len(ref.circuit), draws)
            )
    computed = pl.DataFrame(rows, schema=NOISE_FLOOR_SCHEMA)
    if stored is None or stored.is_empty() or stored.schema != NOISE_FLOOR_SCHEMA:
        return computed
    return pl.concat([computed, stored]).sort("probe", "method", "kind")


def build(a: Analysis) -> dict[str, pl.DataFrame]:
    return {"noise_floor": a.floor}


def section(page: Page) -> list[Block]:
    """The noise-floor table, where there is one."""
    if page.tables["noise_floor"].is_empty():
        return []
    return [
        ("h2", "Noise floor of circuit discovery (base model against itself)"),
        ("table", page.tables["noise_floor"]),
    ]
