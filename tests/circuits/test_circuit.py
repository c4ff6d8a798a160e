from __future__ import annotations

import polars as pl
import pytest

from dcv.circuits.circuit import CIRCUIT_SCHEMA, circuit_table, faithfulness, rank_heads, select_circuit
from dcv.circuits.decoder import model_shape
from dcv.circuits.patching import head_effects
from dcv.config import CircuitsConfig
from dcv.tables import HEAD_EFFECTS_SCHEMA


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
        schema=HEAD_EFFECTS_SCHEMA,
    )
    assert rank_heads(table) == [(0, 1), (1, 0), (0, 0), (1, 1)]


def test_select_circuit_is_the_smallest_top_set_reaching_tau(tiny_model, ioi_items):
    effects = head_effects(tiny_model, ioi_items, "tiny", "ioi")
    ranked = rank_heads(effects)
    k_max = len(ranked) - 1  # 7 of the 8 heads: no set is everything, so F = 1 is not given
    # The curve, measured apart from select_circuit: F of the top-1 .. top-k_max sets.
    curve = faithfulness(tiny_model, ioi_items, [set(ranked[:k]) for k in range(1, k_max + 1)])
    first = select_circuit(tiny_model, ioi_items, effects, CircuitsConfig(tau=0.5, k_max=k_max))
    assert first.curve == pytest.approx(curve, abs=1e-6)
    # tau just below F(top-k): the answer is the first size whose F reaches it (k itself, or a smaller
    # size where the curve is not monotone), known from the curve alone.
    taus = [f - 1e-6 for f in curve if 1e-3 < f <= 2]  # CircuitsConfig: 0 < tau <= 2
    expected_sizes = [next(j + 1 for j, f in enumerate(curve) if f >= tau) for tau in taus]
    assert len(set(expected_sizes)) > 1, f"a degenerate curve {curve}: every tau picks the same size"
    for tau, size in zip(taus, expected_sizes, strict=True):
        circuit = select_circuit(tiny_model, ioi_items, effects, CircuitsConfig(tau=tau, k_max=k_max))
        assert len(circuit) == size, (tau, curve)
        assert list(circuit.heads) == ranked[:size]
        assert circuit.reached_tau and circuit.faithfulness == pytest.approx(curve[size - 1], abs=1e-6)
    # Above every F: the largest allowed set, marked as not reaching tau.
    tau = max(curve) + 0.05
    circuit = select_circuit(tiny_model, ioi_items, effects, CircuitsConfig(tau=tau, k_max=k_max))
    assert len(circuit) == k_max and not circuit.reached_tau
    assert circuit.faithfulness == pytest.approx(curve[-1], abs=1e-6)
    table = circuit_table(circuit, effects)
    assert table.schema == CIRCUIT_SCHEMA and table["rank"].to_list() == list(range(1, k_max + 1))


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
