"""Faithfulness curves (MIB's CPR and CMD): the grid, the areas, and the curve the circuits stage stores."""

from __future__ import annotations

import copy

import polars as pl
import pytest
import torch

from dcv.circuits.circuit import faithfulness, rank_heads
from dcv.circuits.curves import curve_areas, curve_sizes, faithfulness_curve
from dcv.circuits.decoder import model_shape
from dcv.circuits.model_circuits import model_circuits
from dcv.circuits.patching import head_effects
from dcv.config import CircuitsConfig, parse_config
from dcv.tables import CIRCUITS_SCHEMA, FAITHFULNESS_CURVES_SCHEMA, faithfulness_curves
from tests.helpers import PLANTED, tiny_config_dict

# 12 heads in the planted model: k = 1, 1, 2, 3, 4, 6, 12 (0.05 and 0.08 share k = 1).
FRACTIONS = [0.05, 0.08, 0.1, 0.2, 1 / 3, 0.5, 1.0]


def test_constant_one_has_cpr_one_and_cmd_zero():
    assert curve_areas([0.001, 0.01, 0.1, 1.0], [1.0] * 4) == pytest.approx((1.0, 0.0))


def test_linear_ramps_have_their_closed_form_areas():
    # F = x on [0.25, 1]: mean of F = (0.25 + 1) / 2; mean of 1 - F = 1 - that.
    x = [0.25, 0.5, 1.0]
    assert curve_areas(x, x) == pytest.approx((0.625, 0.375))
    # F from 0 to 2 on [0, 1] (fractions start above 0 in config; the math does not care): CPR 1, and |1 - F|
    # is two triangles of area 1/4 (the segment crossing F = 1 is split there, not averaged to 0).
    assert curve_areas([0.0, 1.0], [0.0, 2.0]) == pytest.approx((1.0, 0.5))
    assert curve_areas([0.0, 0.5, 1.0], [0.0, 1.0, 2.0]) == pytest.approx((1.0, 0.5))
    # One point: itself; a non-finite point: no areas.
    assert curve_areas([0.1], [0.7]) == pytest.approx((0.7, 0.3))
    assert all(v != v for v in curve_areas([0.1, 0.2], [0.5, float("nan")]))
    with pytest.raises(ValueError, match="increase"):
        curve_areas([0.2, 0.1], [1.0, 1.0])


def test_the_grid_maps_fractions_to_k_and_dedupes():
    # SmolLM2's 270 heads on MIB's grid: 10 fractions, 9 distinct k (0.1 * 270 stays 27, not 28).
    mib = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
    assert curve_sizes(mib, 270) == [1, 1, 2, 3, 6, 14, 27, 54, 135, 270]
    assert curve_sizes(FRACTIONS, 12) == [1, 1, 2, 3, 4, 6, 12]
    with pytest.raises(ValueError, match="n_heads"):
        curve_sizes([0.5], 0)


def test_the_grid_is_a_validated_config_field(tmp_path):
    assert CircuitsConfig().curve_fractions == [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
    raw = tiny_config_dict(tmp_path)  # the demo's: curves off
    assert parse_config(raw).circuits.curve_fractions == []
    for bad in ([0.5, 0.1], [0.0, 0.5], [0.5, 1.5], [0.1, 0.1]):
        raw["circuits"]["curve_fractions"] = bad
        with pytest.raises(ValueError, match="curve_fractions"):
            parse_config(raw)


def _effects(model, items, model_id: str) -> pl.DataFrame:
    table = head_effects(model, items, model_id, "planted", "exact")
    return table.with_columns(pl.lit("trial").alias("trial"), pl.lit(0, dtype=pl.Int64).alias("step"))


def test_planted_curve_reaches_one_at_the_planted_size_and_the_stage_row_is_direct_calls(
    planted_model, planted_items, tmp_path
):
    raw = tiny_config_dict(tmp_path)
    raw["circuits"].update(selection="top_k", top_k=len(PLANTED), curve_fractions=FRACTIONS)
    cfg = parse_config(raw)
    items = {"planted": planted_items}
    base_effects = _effects(planted_model, planted_items, "base")
    ranking = rank_heads(base_effects)
    assert set(ranking[: len(PLANTED)]) == PLANTED

    base = model_circuits(planted_model, items, base_effects, cfg, None, fractions=FRACTIONS)
    assert base.schema == CIRCUITS_SCHEMA
    row = base.row(0, named=True)
    assert row["curve_k"] == [1, 1, 2, 3, 4, 6, 12] and row["curve_fractions"] == FRACTIONS
    curve = dict(zip(row["curve_k"], row["curve_faithfulness"], strict=True))
    # The planted heads are the only writers: their top-4 set is the whole model, fewer are not.
    assert curve[4] == pytest.approx(1.0, abs=1e-5) and curve[12] == pytest.approx(1.0, abs=1e-5)
    assert curve[3] < 0.99
    direct = [faithfulness(planted_model, planted_items, [set(ranking[:k])])[0] for k in row["curve_k"]]
    assert row["curve_faithfulness"] == pytest.approx(direct, abs=1e-6)

    # A checkpoint is scored on the *base* ranking, not its own: damage the base's top head.
    damaged = copy.deepcopy(planted_model)
    layer, head = ranking[0]
    d_head = model_shape(damaged).d_head
    with torch.no_grad():
        damaged.model.layers[layer].self_attn.o_proj.weight[:, head * d_head : (head + 1) * d_head] = 0
    own = _effects(damaged, planted_items, "ckpt")
    assert rank_heads(own)[0] != ranking[0]
    reference = {("planted", "exact"): list(ranking[: len(PLANTED)])}
    rankings = {("planted", "exact"): ranking}
    ckpt = model_circuits(damaged, items, own, cfg, reference, rankings, FRACTIONS).row(0, named=True)
    sizes, values = faithfulness_curve(damaged, planted_items, ranking, FRACTIONS)
    assert ckpt["curve_k"] == sizes
    assert ckpt["curve_faithfulness"] == pytest.approx(values, abs=1e-6)
    direct = [faithfulness(damaged, planted_items, [set(ranking[:k])])[0] for k in sizes]
    assert values == pytest.approx(direct, abs=1e-6)
    assert ckpt["curve_faithfulness"][sizes.index(4)] == pytest.approx(ckpt["base_circuit_faithfulness"])

    # The stored table: one row per point, the shared k's F repeated.
    table = faithfulness_curves(pl.concat([base, model_circuits(damaged, items, own, cfg, reference)]))
    assert table.schema == FAITHFULNESS_CURVES_SCHEMA
    assert table.height == len(FRACTIONS)  # no grid given for the checkpoint: no curve, no rows
    assert table.filter(pl.col("fraction") < 0.09)["faithfulness"].n_unique() == 1


def test_methods_without_a_ranking_have_no_curve(planted_model, planted_items, tmp_path):
    raw = tiny_config_dict(tmp_path)
    raw["circuits"].update(selection="top_k", top_k=2)
    cfg = parse_config(raw)
    masks = _effects(planted_model, planted_items, "base").with_columns(
        pl.lit("mask").alias("method"), (pl.col("effect").abs() > 1e-6).cast(pl.Float64).alias("effect")
    )
    row = model_circuits(
        planted_model, {"planted": planted_items}, masks, cfg, None, fractions=FRACTIONS
    ).row(0, named=True)
    assert row["curve_k"] == [] and row["curve_faithfulness"] == [] and row["curve_fractions"] == []


def test_the_grid_as_computed_names_the_circuit_files(tmp_path):
    """The grid a run computes is in the file's name (a changed grid recomputes, calibration's files
    without curves are apart), the configured one is not (calibration turns curves off whatever it says)."""
    from dcv.circuits.model_circuits import model_file

    cfg = parse_config(tiny_config_dict(tmp_path))
    other = cfg.model_copy(update={"circuits": cfg.circuits.model_copy(update={"curve_fractions": [0.5]})})
    names = {
        model_file(c, tmp_path, "base", "tiny", None, grid) for c in (cfg, other) for grid in ([], [0.5])
    }
    assert len(names) == 2
    assert model_file(cfg, tmp_path, "base", "tiny", None) not in names  # no curves at all (noise floor)
