"""Chance levels beside P and J, and "lost is lost everywhere" (docs/method.md "Competence guard and the
lost rule"), on the hand-built analysis tables of ``tests.helpers`` (those of tests/test_analysis.py): 4
heads, a base circuit of 2; SFT's own circuit at step 4 is 2 heads, one of them the base's."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from dcv.analysis import analyze
from dcv.analysis.inputs import build_inputs
from dcv.config import parse_config
from dcv.report import build_report
from tests.helpers import N_ITEMS, circuits_table, effects_table, results_table, tiny_config_dict


def config(tmp_path):
    raw = tiny_config_dict(tmp_path)
    raw["probes"] = [{"name": "ioi", "n_items": N_ITEMS}]
    raw["patching"]["methods"] = ["exact"]
    raw["circuits"].update(n_bootstrap=50)
    return parse_config(raw)


SFT4 = (pl.col("trial") == "sft-seed0") & (pl.col("step") == 4)
COLLAPSED = pl.col("model").str.starts_with("sft") & (pl.col("step") == 4)


def row_of(table: pl.DataFrame, where: pl.Expr = SFT4) -> dict:
    rows = table.filter(where)
    assert rows.height == 1, rows
    return rows.row(0, named=True)


def collapsed_gap(effects: pl.DataFrame, gap: float) -> pl.DataFrame:
    """SFT's step-4 checkpoints keep ``gap`` of the base gap (1.0) on every item."""
    return effects.with_columns(
        pl.when(COLLAPSED & (pl.col("method") != "mask"))
        .then(pl.lit([gap] * N_ITEMS, pl.List(pl.Float64)))
        .otherwise("item_denominator")
        .alias("item_denominator")
    )


def mask_rows(effects: pl.DataFrame) -> pl.DataFrame:
    """Learned masks (one pseudo-item of 1, effect = m_h) beside the exact effects, as the pipeline stores."""
    return effects.with_columns(
        pl.lit("mask").alias("method"),
        pl.col("effect").clip(0, 1).alias("effect"),
        pl.col("effect")
        .clip(0, 1)
        .map_elements(lambda v: [v], return_dtype=pl.List(pl.Float64))
        .alias("item_delta"),
        pl.lit([1.0], pl.List(pl.Float64)).alias("item_denominator"),
    )


def with_masks(circuits: pl.DataFrame, only: bool = False) -> pl.DataFrame:
    masks = circuits.with_columns(pl.lit("mask").alias("method"))
    return masks if only else pl.concat([circuits, masks])


def mask_config(tmp_path, methods):
    raw = config(tmp_path).model_dump(mode="json")
    raw["patching"]["methods"] = methods
    return parse_config(raw)


def test_chance_levels_stand_beside_p_and_j(tmp_path):
    tables = analyze(config(tmp_path), results_table(), effects_table(), circuits_table())
    row = row_of(tables["checkpoints"])
    # 2 of 4 heads against a base circuit of 2: E[P] = 2/4; E[J] over the 6 pairs = (1 + 4 * 1/3) / 6.
    assert row["preservation_chance"] == pytest.approx(0.5)
    assert row["jaccard_chance"] == pytest.approx(7 / 18)
    assert row["preservation_above_chance"] == pytest.approx(0.5 - 0.5)
    assert row["jaccard_above_chance"] == pytest.approx(1 / 3 - 7 / 18)
    summary = row_of(tables["summary"])
    assert summary["preservation_chance"] == pytest.approx(0.5)
    assert summary["jaccard_above_chance"] == pytest.approx(1 / 3 - 7 / 18)
    retention = row_of(tables["paper"], pl.col("quantity") == "retention_pct")
    assert (
        retention["chance_base"] == retention["chance_sft"] == retention["chance_rl"] == pytest.approx(50.0)
    )
    # The seed paper's own circuits (297, 265 and 296 of 576 heads): 51.6%, 46.0% and 51.4% by chance.
    assert retention["paper_chance_sft"] == pytest.approx(46.0, abs=0.05)
    assert retention["paper_chance_rl"] == pytest.approx(51.4, abs=0.05)
    assert row_of(tables["paper"], pl.col("quantity") == "faithfulness")["chance_sft"] is None
    md, _, _ = build_report(tables, tmp_path / "report", "t", ["about"], {})
    text = md.read_text()
    assert "Retention beside chance (exact): base 100% (chance 50%, above chance by 50 pp)" in text
    assert "The seed paper: SFT 52% (chance 46%, above chance by 5.99 pp)" in text
    # At matched points too: the checkpoint vector carries the means over the probes in means.
    data = build_inputs(config(tmp_path), results_table(), effects_table(), circuits_table(), "exact")
    assert data.points[("sft-seed0@4", 4)].fixed["jaccard_chance"] == pytest.approx(7 / 18)


def test_a_lost_checkpoint_has_no_number_divided_by_its_own_gap(tmp_path):
    """SFT at step 4 keeps a tenth of the base gap: its own-circuit F, F(C_base, M) (both stored by the
    circuits stage, divided by that gap: here an inflated 7.5), the effect Spearman, P, J, relative V and
    the chance levels are all null; the matched comparison's F(C_base, M) leaves the probe out."""
    effects = collapsed_gap(effects_table(), 0.1)
    circuits = circuits_table().with_columns(
        pl.when(pl.col("model").str.starts_with("sft") & (pl.col("step") == 4))
        .then(7.5)
        .otherwise(pl.col(c))
        .alias(c)
        for c in ("faithfulness", "base_circuit_faithfulness")
    )
    tables = analyze(config(tmp_path), results_table(), effects, circuits)
    row = row_of(tables["checkpoints"])
    assert row["status"] == "lost"
    assert row["faithfulness"] is None and row["base_circuit_faithfulness"] is None  # not 7.5
    assert row["effect_spearman"] is None
    nulls = (
        "faithfulness",
        "base_circuit_faithfulness",
        "effect_spearman",
        "preservation",
        "jaccard",
        "circuit_vulnerability",
        "preservation_chance",
        "jaccard_chance",
        "preservation_above_chance",
    )
    assert {c: row[c] for c in nulls} == dict.fromkeys(nulls)
    assert row["circuit_vulnerability_abs"] == pytest.approx(0.4)  # over the base's gap: a number
    summary = row_of(tables["summary"])
    assert summary["faithfulness"] is None and summary["base_circuit_faithfulness"] is None
    paper = row_of(tables["paper"], pl.col("quantity") == "faithfulness")
    assert paper["sft"] is None and paper["rl"] == pytest.approx(0.9)  # both SFT runs lost it: not 7.5
    data = build_inputs(config(tmp_path), results_table(), effects, circuits, "exact")
    assert np.isnan(data.points[("sft-seed0@4", 4)].fixed["base_circuit_faithfulness"])
    assert data.points[("sft-seed0@2", 2)].fixed["base_circuit_faithfulness"] == pytest.approx(0.9)
    # Not lost: every number is there.
    kept = row_of(tables["checkpoints"], (pl.col("trial") == "rl-seed0") & (pl.col("step") == 4))
    assert None not in (kept["faithfulness"], kept["effect_spearman"], kept["preservation_chance"])


def test_masks_take_the_lost_rule_from_another_methods_gap(tmp_path):
    """Masks' parts hold a pseudo-gap of 1 in every model: without the exact method's real gap (0.1 of
    the base's here) a model that forgot the probe would read "ok", with all its mask numbers."""
    effects = collapsed_gap(effects_table(), 0.1)
    effects = pl.concat([effects, mask_rows(effects)])
    tables = analyze(
        mask_config(tmp_path, ["exact", "mask"]), results_table(), effects, with_masks(circuits_table())
    )
    masks = tables["checkpoints"].filter(pl.col("patching") == "mask")
    row = row_of(masks)
    assert row["status"] == "lost" and row["lost"]
    assert row["gap"] == pytest.approx(0.1) and row["base_gap"] == pytest.approx(1.0)
    assert row["preservation"] is None and row["faithfulness"] is None and row["effect_spearman"] is None
    assert row_of(masks, (pl.col("trial") == "sft-seed0") & (pl.col("step") == 2))["status"] == "ok"
    summary = tables["summary"].filter(pl.col("patching") == "mask")
    assert row_of(summary)["n_lost"] == 1


def test_masks_trained_on_no_gap_are_lost_not_ok(tmp_path):
    """Masks alone (no other method's gap): ``learn_masks`` gives all-zero masks on a gap <= 0, an empty
    circuit and P = 0, V = 1; that checkpoint is lost, never "ok"."""
    effects = mask_rows(effects_table()).with_columns(
        pl.when(COLLAPSED).then(0.0).otherwise("effect").alias("effect"),
        pl.when(COLLAPSED)
        .then(pl.lit([0.0], pl.List(pl.Float64)))
        .otherwise("item_delta")
        .alias("item_delta"),
    )
    circuits = with_masks(circuits_table(), only=True).with_columns(
        pl.when(COLLAPSED).then(0).otherwise("size").alias("size"),
        pl.when(COLLAPSED).then(pl.lit([], pl.List(pl.Int32))).otherwise("layers").alias("layers"),
        pl.when(COLLAPSED).then(pl.lit([], pl.List(pl.Int32))).otherwise("heads").alias("heads"),
        pl.when(COLLAPSED).then(0.0).otherwise("faithfulness").alias("faithfulness"),
    )
    tables = analyze(mask_config(tmp_path, ["mask"]), results_table(), effects, circuits)
    row = row_of(tables["checkpoints"])
    assert row["status"] == "lost" and row["gap"] <= 0
    assert row["preservation"] is None and row["circuit_vulnerability"] is None
    # The other checkpoints' masks read their clean LD against the base's (4.0): 0.95 of it, not lost.
    kept = row_of(tables["checkpoints"], (pl.col("trial") == "rl-seed0") & (pl.col("step") == 4))
    assert kept["status"] == "ok" and kept["gap"] == pytest.approx(4.0 * 0.95)


def test_masks_alone_read_the_clean_ld_against_the_base(tmp_path):
    """Masks alone and a checkpoint whose clean LD fell below a quarter of the base's: lost, although its
    masks (the base's) would give P = 1."""
    results = results_table()
    lds = [-0.5, 0.2, -0.1, 0.3]  # mean -0.025 against the base's 4.0
    collapsed = (pl.col("trial").str.starts_with("sft")) & (pl.col("step") == 4)
    results = results.with_columns(
        pl.when(collapsed)
        .then(float(np.mean(lds)))
        .otherwise("probe/ioi/mean_ld")
        .alias("probe/ioi/mean_ld"),
        pl.when(collapsed)
        .then(pl.lit(lds, pl.List(pl.Float64)))
        .otherwise("probe/ioi/item_ld")
        .alias("probe/ioi/item_ld"),
    )
    effects = mask_rows(effects_table())
    tables = analyze(
        mask_config(tmp_path, ["mask"]), results, effects, with_masks(circuits_table(), only=True)
    )
    row = row_of(tables["checkpoints"])
    assert row["status"] == "lost" and row["gap"] == pytest.approx(-0.025)
    assert row["base_gap"] == pytest.approx(4.0)
