from __future__ import annotations

import polars as pl
import pytest

from dcv.circuits.circuit import CIRCUIT_SCHEMA, circuit_table, faithfulness, rank_heads, select_circuit
from dcv.circuits.decoder import model_shape
from dcv.circuits.patching import EFFECT_SCHEMA, head_effects
from dcv.config import CircuitsConfig


def test_faithfulness_of_everything_and_nothing(tiny_model, ioi_items):
    every_head = set(model_shape(tiny_model).heads)
    full, empty = faithfulness(tiny_model, ioi_items, [every_head, set()], batch_size=5, sets_per_forward=1)
    assert full == pytest.approx(1.0, abs=1e-5)
    assert empty == pytest.approx(0.0, abs=1e-5)


def test_faithfulness_batched_sets_agree_with_one_at_a_time(tiny_model, ioi_items):
    heads = model_shape(tiny_model).heads
    sets = [set(heads[:k]) for k in range(len(heads) + 1)]
    together = faithfulness(tiny_model, ioi_items, sets, batch_size=12, sets_per_forward=9)
    alone = [faithfulness(tiny_model, ioi_items, [s], batch_size=12)[0] for s in sets]
    assert together == pytest.approx(alone, abs=1e-5)


def test_one_head_left_out_matches_single_head_patching(tiny_model, ioi_items):
    """F(all but h) = 1 - e_h: leaving one head out is patching it alone."""
    heads = model_shape(tiny_model).heads
    effects = head_effects(tiny_model, ioi_items, "tiny", "ioi")
    f = faithfulness(tiny_model, ioi_items, [set(heads) - {h} for h in heads])
    lookup = {(layer, head): e for layer, head, e in effects.select("layer", "head", "effect").iter_rows()}
    assert f == pytest.approx([1 - lookup[h] for h in heads], abs=1e-4)


def test_rank_heads_by_magnitude():
    table = pl.DataFrame(
        {
            "model": ["m"] * 4,
            "probe": ["p"] * 4,
            "method": ["exact"] * 4,
            "layer": [0, 0, 1, 1],
            "head": [0, 1, 0, 1],
            "effect": [0.1, -0.5, 0.3, 0.1],
            "n_items": [4] * 4,
        },
        schema=EFFECT_SCHEMA,
    )
    assert rank_heads(table) == [(0, 1), (1, 0), (0, 0), (1, 1)]


def test_select_circuit_is_the_smallest_top_set_reaching_tau(tiny_model, ioi_items):
    effects = head_effects(tiny_model, ioi_items, "tiny", "ioi")
    cfg = CircuitsConfig(tau=0.9, k_max=8)
    circuit = select_circuit(tiny_model, ioi_items, effects, cfg)
    ranked = rank_heads(effects)
    assert list(circuit.heads) == ranked[: len(circuit)]
    assert len(circuit.curve) == 8
    if circuit.reached_tau:
        assert circuit.faithfulness >= 0.9
        assert all(f < 0.9 for f in circuit.curve[: len(circuit) - 1])
    else:
        assert len(circuit) == 8
    table = circuit_table(circuit, effects)
    assert table.schema == CIRCUIT_SCHEMA and table["rank"].to_list() == list(range(1, len(circuit) + 1))


def test_select_top_k(tiny_model, ioi_items):
    effects = head_effects(tiny_model, ioi_items, "tiny", "ioi")
    circuit = select_circuit(tiny_model, ioi_items, effects, CircuitsConfig(selection="top_k", top_k=3))
    assert list(circuit.heads) == rank_heads(effects)[:3]
    assert circuit.faithfulness == pytest.approx(faithfulness(tiny_model, ioi_items, [set(circuit.heads)])[0])


def test_select_circuit_rejects_mixed_or_empty_tables(tiny_model, ioi_items):
    effects = head_effects(tiny_model, ioi_items, "tiny", "ioi")
    mixed = pl.concat([effects, effects.with_columns(pl.lit("capitals").alias("probe"))])
    with pytest.raises(ValueError, match="one model, one probe and one method"):
        select_circuit(tiny_model, ioi_items, mixed, CircuitsConfig())
    with pytest.raises(ValueError, match="empty"):
        select_circuit(tiny_model, ioi_items, effects.clear(), CircuitsConfig())
