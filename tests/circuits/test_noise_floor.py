"""The noise floor v2: the base circuit against the base model's circuit on bootstrap resamples of its
own items, with the same one-directional P and J as checkpoints (and, for masks, refits)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from dcv.circuits.noise_floor import NOISE_FLOOR_SCHEMA, bootstrap_floor, floor_row, mask_noise_floor
from dcv.circuits.pipeline import build_work_items, compute_item
from dcv.config import parse_config
from dcv.results import build_results_table
from tests.helpers import tiny_config_dict


def test_vulnerability_floor_matches_the_known_item_noise():
    """One circuit head whose per-item parts are 1 + noise (sd 0.5), gap 1 per item: V of a resample is
    -(mean of resampled noise - mean noise), so its 95th percentile is 1.645 s / sqrt(n)."""
    rng = np.random.default_rng(1)
    n = 400
    noise = rng.normal(0, 0.5, n)
    delta = np.vstack([1 + noise, np.full(n, 0.01)])
    draws = bootstrap_floor(delta, np.ones(n), np.array([0]), n_resamples=2000, seed=0)
    expected = 1.645 * noise.std() / np.sqrt(n)
    row = floor_row("p", "exact", "bootstrap", n, 1, draws)
    assert row["circuit_vulnerability"] == pytest.approx(expected, rel=0.15)
    assert row["preservation"] == 1.0 and row["n_resamples"] == 2000  # the head is always on top


def test_heads_that_compete_for_the_last_slot_lower_the_floor():
    """Heads 1 and 2 have the same mean effect with item noise: the resampled top-2 swaps them about half
    the time, so P's 5th percentile is 1/2 and J's 1/3; a clear-cut circuit stays at 1."""
    rng = np.random.default_rng(0)
    n = 32
    noise = rng.normal(0, 0.5, n)
    noise -= noise.mean()  # heads 1 and 2 tie on all items; either wins a resample
    delta = np.vstack([np.full(n, 3.0), 1 + noise, 1 - noise, np.zeros(n)])
    draws = bootstrap_floor(delta, np.ones(n), np.array([0, 1]), 500)
    row = floor_row("p", "exact", "bootstrap", n, 2, draws)
    assert row["preservation"] == pytest.approx(0.5) and row["jaccard"] == pytest.approx(1 / 3)
    assert 0.1 < np.mean(draws["preservation"] < 1) < 0.9
    clear = bootstrap_floor(delta, np.ones(n), np.array([0]), 500)
    assert floor_row("p", "exact", "bootstrap", n, 1, clear)["preservation"] == 1.0


def test_mask_floor_of_planted_heads(planted_model, planted_items, tmp_path):
    """Only the planted heads carry the answer, so masks learned again on resamples (and with another
    seed) find them again: P = J = 1, V near 0."""
    raw = tiny_config_dict(tmp_path)
    raw["patching"].update(methods=["mask"], head_chunk_size=100, batch_size=8)
    raw["circuits"].update(mask={"steps": 60}, mask_noise_floor_resamples=2)
    cfg = parse_config(raw)
    work = build_work_items(cfg, build_results_table([]), ["ioi"])
    item = {**work.row(0, named=True), "n_layers": 3, "n_heads": 4, "head_start": 0, "head_end": 12}
    effects = compute_item(planted_model, planted_items, item, cfg)
    from dcv.circuits.mask import mask_circuit

    reference = {("ioi", "mask"): mask_circuit(effects)}
    floor = mask_noise_floor(planted_model, {"ioi": planted_items}, effects, reference, cfg)
    assert floor.schema == NOISE_FLOOR_SCHEMA
    assert floor["kind"].to_list() == ["bootstrap", "seed"] and floor["n_resamples"].to_list() == [2, 1]
    assert floor["preservation"].to_list() == [1.0, 1.0] and floor["jaccard"].to_list() == [1.0, 1.0]
    assert (floor["circuit_vulnerability"].abs() < 0.1).all() and (floor["size"] == 4).all()
    assert pl.Series(floor["n_items"]).to_list() == [len(planted_items)] * 2
