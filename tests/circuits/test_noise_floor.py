"""The noise floor: the base circuit found twice, from disjoint item halves (and another mask seed)."""

from __future__ import annotations

import polars as pl
import pytest

from dcv.circuits.noise_floor import NOISE_FLOOR_SCHEMA, agreement, noise_floor, split_halves, subset_effects
from dcv.circuits.pipeline import EFFECTS_SCHEMA, build_work_items, compute_item
from dcv.config import parse_config
from dcv.results import build_results_table
from tests.conftest import tiny_config_dict


def test_halves_are_disjoint_cover_everything_and_depend_on_the_seed():
    a, b = split_halves(9, seed=0)
    assert sorted(a + b) == list(range(9)) and not set(a) & set(b) and {len(a), len(b)} == {4, 5}
    assert split_halves(9, seed=0) == (a, b)
    assert split_halves(9, seed=1) != (a, b)
    with pytest.raises(ValueError, match="at least 2"):
        split_halves(1, seed=0)


def test_subset_effects_are_ratios_of_the_halves_means():
    table = pl.DataFrame(
        {
            "layer": [0, 0],
            "head": [0, 1],
            "effect": [0.0, 0.0],
            "item_delta": [[1.0, 3.0, 5.0, 7.0], [2.0, 2.0, 0.0, 0.0]],
            "item_denominator": [[1.0, 1.0, 2.0, 2.0]] * 2,
        }
    )
    half = subset_effects(table, [0, 1])
    assert half["effect"].to_list() == pytest.approx([2.0, 2.0])
    other = subset_effects(table, [2, 3])
    assert other["effect"].to_list() == pytest.approx([3.0, 0.0])


def test_agreement_of_two_circuits():
    assert agreement([(0, 0), (0, 1)], [(0, 0), (1, 1), (1, 2), (1, 3)]) == pytest.approx((0.2, 0.375))
    assert agreement([(0, 0)], [(0, 0)]) == (1.0, 1.0)
    assert agreement([], []) == (None, None)


def test_planted_heads_agree_with_themselves(planted_model, planted_items, tmp_path):
    """Only the planted heads carry the answer, so every half (and another mask seed) finds them again."""
    raw = tiny_config_dict(tmp_path)
    raw["patching"].update(methods=["exact", "mask"], head_chunk_size=100, batch_size=8)
    raw["circuits"].update(selection="faithfulness", tau=0.99, k_max=12, mask={"steps": 60})
    cfg = parse_config(raw)
    work = build_work_items(cfg, build_results_table([]), ["ioi"])
    n_layers, n_heads = 3, 4  # the planted model's grid
    rows = []
    for item in work.iter_rows(named=True):
        item = {
            **item,
            "n_layers": n_layers,
            "n_heads": n_heads,
            "head_start": 0,
            "head_end": n_layers * n_heads,
        }
        rows.append(compute_item(planted_model, planted_items, item, cfg))
    effects = pl.concat(rows)
    assert effects.schema == EFFECTS_SCHEMA
    floor = noise_floor(planted_model, {"ioi": planted_items}, effects, cfg)
    assert floor.schema == NOISE_FLOOR_SCHEMA
    kinds = sorted(zip(floor["method"], floor["kind"], strict=True))
    assert kinds == [("exact", "halves"), ("mask", "halves"), ("mask", "seed")]
    assert floor["jaccard"].to_list() == pytest.approx([1.0, 1.0, 1.0])
    assert floor["preservation"].to_list() == pytest.approx([1.0, 1.0, 1.0])
    assert (floor["size_a"] == 4).all() and (floor["size_b"] == 4).all()
    halves = floor.filter(pl.col("kind") == "halves")
    assert halves["n_items"].to_list() == [len(planted_items) // 2] * 2
