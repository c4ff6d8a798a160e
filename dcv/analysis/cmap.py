"""The ``cmap`` table: mean |cmap_h| per circuit method, checkpoint, probe and direction; its report
section (``section``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from dcv.analysis.inputs import Analysis, or_none
from dcv.analysis.section import Block, Page
from dcv.config import ExperimentConfig
from dcv.matched import interval
from dcv.storage import BASE_MODEL
from dcv.tables import circuit_heads

CMAP_TABLE_SCHEMA = {
    "patching": pl.String,  # the circuit method whose base circuit the heads are
    "model": pl.String,
    "trial": pl.String,
    "step": pl.Int64,
    "training": pl.String,  # sft | rl (the results table's method)
    "probe": pl.String,
    "direction": pl.String,  # ckpt_into_base | base_into_ckpt
    "mean_abs_cmap_circuit": pl.Float64,  # mean |cmap_h| over the probe's base-circuit heads
    "circuit_ci_low": pl.Float64,  # its percentile CI over B resamples of the probe items
    "circuit_ci_high": pl.Float64,
    "mean_abs_cmap_all": pl.Float64,  # mean |cmap_h| over every head cmap patched (n_heads; no CI)
    "n_circuit_heads": pl.Int64,
    "n_heads": pl.Int64,
    "n_items": pl.Int64,
}


def cmap_table(
    cfg: ExperimentConfig,
    results: pl.DataFrame,
    circuits: pl.DataFrame,
    methods: Sequence[str],
    cmap: pl.DataFrame | None,
) -> pl.DataFrame:
    """CMAP_TABLE_SCHEMA: per circuit method, checkpoint, probe and direction, mean |cmap| over the
    probe's base-circuit heads (with an item-bootstrap CI: ``circuits.n_bootstrap`` resamples of the
    probe items, cmap = mean(delta) / mean(base gap) redone in each) and over every head."""
    if cmap is None or cmap.is_empty():
        return pl.DataFrame(schema=CMAP_TABLE_SCHEMA)
    training = dict(results.select("trial", "method").unique("trial").iter_rows())
    rng = np.random.default_rng(0)
    rows = []
    ordered = cmap.sort("model", "probe", "direction", "layer", "head")
    keys = ("model", "probe", "direction")
    for (model, probe, direction), frame in ordered.group_by(keys, maintain_order=True):
        delta = np.asarray(frame["item_delta"].to_list(), dtype=np.float64)  # [heads, items]
        denominator = np.asarray(frame["item_denominator"][0], dtype=np.float64)  # [items]
        n_items = denominator.shape[0]
        draws = rng.integers(0, n_items, size=(cfg.circuits.n_bootstrap, n_items))
        # [B, heads]: every head's cmap over each resample of the items
        resampled = np.abs(delta[:, draws].mean(axis=2).T / denominator[draws].mean(axis=1)[:, None])
        index = {(la, h): i for i, (la, h) in enumerate(frame.select("layer", "head").iter_rows())}
        first = frame.row(0, named=True)
        for method in methods:
            base = circuits.filter(
                (pl.col("model") == BASE_MODEL) & (pl.col("probe") == probe) & (pl.col("method") == method)
            )
            circuit = circuit_heads(base.row(0, named=True)) if base.height else []
            heads = [index[h] for h in circuit if h in index]
            if len(heads) < len(circuit):
                heads = []  # a circuit head that cmap did not patch: the circuit's mean is not measured
            values = np.abs(frame["effect"].to_numpy())
            low = high = None
            if heads:
                circuit_draws = resampled[:, heads].mean(axis=1, keepdims=True)
                lo, hi, _, _ = interval(circuit_draws, cfg.circuits.ci_level)
                low, high = or_none(lo[0]), or_none(hi[0])
            rows.append(
                {
                    "patching": method,
                    "model": model,
                    "trial": first["trial"],
                    "step": first["step"],
                    "training": training.get(first["trial"]),
                    "probe": probe,
                    "direction": direction,
                    "mean_abs_cmap_circuit": float(values[heads].mean()) if heads else None,
                    "circuit_ci_low": low,
                    "circuit_ci_high": high,
                    "mean_abs_cmap_all": float(values.mean()),
                    "n_circuit_heads": len(heads),
                    "n_heads": frame.height,
                    "n_items": n_items,
                }
            )
    return pl.DataFrame(rows, schema=CMAP_TABLE_SCHEMA)


def build(a: Analysis) -> dict[str, pl.DataFrame]:
    return {"cmap": cmap_table(a.cfg, a.results, a.circuits, a.methods, a.cmap)}


def section(page: Page) -> list[Block]:
    """The primary patching method's cmap rows and how to read them, with cmap in patching.methods."""
    rows = page.tables.get("cmap", pl.DataFrame())
    if not rows.height:
        return []
    return [
        ("h2", "Cross-model activation patching (cmap): did the heads' function change?"),
        (
            "p",
            "Per checkpoint, probe and direction: mean |cmap_h| over the probe's base-circuit heads "
            "(CI over resamples of its n_items probe items) and over every head cmap patched (n_heads: "
            "all of them, or the base's top heads with patching.cmap_top_heads). cmap_h swaps head h's "
            "output (after o_proj) between the base and the checkpoint on the clean prompts, over the "
            "base's LD gap only, so a checkpoint whose behaviour shrank evenly still shows; 0 means the "
            "head computes what the base's did. ckpt_into_base: the checkpoint's head in the base model; "
            "base_into_ckpt: the base's head in the checkpoint.",
        ),
        ("table", rows.filter(pl.col("patching") == page.primary).drop("patching")),
    ]
