"""Calibration on synthetic patching tables whose planted damage is known, and planting on a real model."""

from __future__ import annotations

import copy

import numpy as np
import polars as pl
import pytest

from dcv.calibration import CALIBRATION_SCHEMA, Plant, calibration_table, plan_plants, plant_damage
from dcv.config import parse_config
from dcv.results import build_results_table
from dcv.tables import CIRCUITS_SCHEMA, EFFECTS_SCHEMA
from tests.helpers import tiny_config_dict

SHAPE = (2, 4)  # 8 heads
BASE = [1.0, 0.8, 0.6, 0.05, 0.04, 0.03, 0.02, 0.01]  # heads 0.0, 0.1, 0.2 carry the behaviour
CIRCUIT = [(0, 0), (0, 1), (0, 2)]
N = 24


def effect_rows(model: str, effects: list[float], seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i, e in enumerate(effects):
        layer, head = divmod(i, SHAPE[1])
        delta = (e * (1 + rng.normal(0, 0.2, N))).tolist()
        rows.append(
            {
                "model": model,
                "probe": "ioi",
                "method": "exact",
                "layer": layer,
                "head": head,
                "effect": e,
                "n_items": N,
                "trial": model,
                "step": 1,
                "checkpoint": "x",
                "item_delta": delta,
                "item_denominator": [1.0] * N,
            }
        )
    return rows


def ablated(heads) -> list[float]:
    return [0.0 if divmod(i, SHAPE[1]) in set(heads) else e for i, e in enumerate(BASE)]


def circuit_row(model: str, heads) -> dict:
    return {
        "model": model,
        "trial": model,
        "step": 1,
        "probe": "ioi",
        "method": "exact",
        "size": len(heads),
        "faithfulness": 0.9,
        "reached_tau": True,
        "base_circuit_faithfulness": 0.9,
        "layers": [la for la, _ in heads],
        "heads": [h for _, h in heads],
    }


def test_planted_circuit_heads_are_detected_and_the_copy_is_not(tmp_path):
    raw = tiny_config_dict(tmp_path)
    raw["patching"]["methods"] = ["exact"]
    raw["circuits"].update(n_bootstrap=300, noise_floor_resamples=200)
    cfg = parse_config(raw)
    plants = [
        Plant("", "copy", 0, ()),
        Plant("ioi", "circuit", 1, ((0, 0),)),
        Plant("ioi", "circuit", 2, ((0, 0), (0, 1))),
        Plant("ioi", "random", 2, ((1, 2), (1, 3))),
    ]
    effects, circuits, results = [], [circuit_row("base", CIRCUIT)], []
    effects += effect_rows("base", BASE, seed=0)
    ld = [3.0] * N
    results.append(
        {
            "trial": "base",
            "method": "base",
            "learning_rate": 0.0,
            "seed": 0,
            "init": "base",
            "step": 0,
            "checkpoint": "b",
            "metrics": {},
        }
    )
    for plant in plants:
        model = f"{plant.name}@1"
        # The copy's parts are the base's exactly (same weights, same items).
        effects += effect_rows(model, ablated(plant.heads), seed=0)
        own = [h for h in CIRCUIT if h not in plant.heads] + [(1, 0)] * 0
        circuits.append(circuit_row(model, own or [(1, 0)]))
        results.append(
            {
                "trial": plant.name,
                "method": "planted",
                "learning_rate": 0.0,
                "seed": 0,
                "init": "base",
                "step": 1,
                "checkpoint": "p",
                "metrics": {},
            }
        )
    table = build_results_table(results)
    table = table.with_columns(pl.Series("probe/ioi/item_ld", [ld] * table.height, dtype=pl.List(pl.Float64)))
    out = calibration_table(
        cfg,
        plants,
        table,
        pl.DataFrame(effects, schema=EFFECTS_SCHEMA),
        pl.DataFrame(circuits, schema=CIRCUITS_SCHEMA),
        SHAPE,
        0.0,
    )
    assert out.schema == CALIBRATION_SCHEMA
    rows = {(r["kind"], r["k"]): r for r in out.iter_rows(named=True)}
    copy_row = rows[("copy", 0)]
    assert copy_row["circuit_vulnerability_abs"] == pytest.approx(0.0) and not copy_row["flagged"]
    assert copy_row["preservation"] == 1.0
    one, two = rows[("circuit", 1)], rows[("circuit", 2)]
    # Head 0.0 (weight 1.0 of 2.4) ablated: V = 1/2.4; both heads: 1.8/2.4.
    assert one["circuit_vulnerability_abs"] == pytest.approx(1.0 / 2.4, abs=0.05)
    assert two["circuit_vulnerability_abs"] == pytest.approx(1.8 / 2.4, abs=0.05)
    assert one["detected"] and two["detected"] and two["planted_in_top_k"] == 2 and two["recall"] == 1.0
    assert one["v_ci_low"] > 0 and two["below_floor"]
    # Damage outside the circuit barely moves V: less than the top-1 circuit head's.
    assert rows[("random", 2)]["circuit_vulnerability_abs"] < one["circuit_vulnerability_abs"]
    assert (out["min_detectable_k"] == 1).all() and (out["mde_vulnerability"] > 0).all()


def test_plan_and_plant(tiny_model):
    plants = plan_plants({"ioi": CIRCUIT}, SHAPE, [1, 2, 5], seed=0)
    kinds = [(p.kind, p.k) for p in plants]
    assert kinds == [("copy", 0), ("circuit", 1), ("random", 1), ("circuit", 2), ("random", 2), ("random", 5)]
    assert plants[3].heads == ((0, 0), (0, 1))
    assert all(not set(p.heads) & set(CIRCUIT) for p in plants if p.kind == "random")
    assert plan_plants({"ioi": CIRCUIT}, SHAPE, [2], seed=0) == plan_plants(
        {"ioi": CIRCUIT}, SHAPE, [2], seed=0
    )
    model = copy.deepcopy(tiny_model)
    d = model.config.hidden_size // model.config.num_attention_heads
    before = model.model.layers[1].self_attn.o_proj.weight.detach().clone()
    plant_damage(model, [(1, 2)], 0.5)
    after = model.model.layers[1].self_attn.o_proj.weight
    assert np.allclose(after[:, 2 * d : 3 * d].detach().numpy(), 0.5 * before[:, 2 * d : 3 * d].numpy())
    assert np.array_equal(after[:, : 2 * d].detach().numpy(), before[:, : 2 * d].numpy())
