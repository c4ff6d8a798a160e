from __future__ import annotations

import polars as pl
import pytest
import torch
from pydantic import ValidationError

from dcv.circuits.circuit import select_circuit
from dcv.circuits.decoder import model_shape
from dcv.circuits.mask import mask_circuit, mask_effects, temperature
from dcv.circuits.patching import head_effects
from dcv.config import CircuitsConfig, ConfigError, MaskConfig, parse_config
from dcv.tables import HEAD_EFFECTS_SCHEMA
from dcv.tasks.items import ProbeItem
from tests.helpers import PLANTED, tiny_config_dict

FAST = MaskConfig(steps=60)


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def test_mask_and_exact_patching_recover_the_planted_heads(planted_model, planted_items):
    table = mask_effects(planted_model, planted_items, FAST, "planted", "planted", batch_size=8)
    found = set(mask_circuit(table))
    assert jaccard(found, PLANTED) >= 0.9, (found, table)
    # The masks end binary: the planted heads near 1, the silent ones near 0.
    masks = {(layer, head): m for layer, head, m in table.select("layer", "head", "effect").iter_rows()}
    assert all(masks[h] > 0.95 for h in PLANTED)
    assert all(m < 0.05 for h, m in masks.items() if h not in PLANTED)

    effects = head_effects(planted_model, planted_items, "planted", "planted", "exact")
    exact = select_circuit(planted_model, planted_items, effects, CircuitsConfig(tau=0.99, k_max=12))
    assert jaccard(set(exact.heads), PLANTED) >= 0.9, exact
    assert exact.faithfulness == pytest.approx(1.0, abs=1e-4)


def test_heads_outside_the_given_ones_stay_clean_and_are_not_reported(planted_model, planted_items):
    # (0, 1) is planted; with (1, 2), (1, 3), (2, 0) held clean, it alone still carries its share.
    heads = [(0, 0), (0, 1), (2, 3)]
    table = mask_effects(planted_model, planted_items, FAST, "planted", "planted", heads=heads, batch_size=8)
    assert list(zip(table["layer"], table["head"], strict=True)) == heads
    assert mask_circuit(table) == [(0, 1)]


def test_table_has_the_effect_schema_and_method_mask(planted_model, planted_items):
    cfg = MaskConfig(steps=5)
    table = mask_effects(planted_model, planted_items, cfg, "planted", "probe-x", batch_size=8)
    assert table.schema == HEAD_EFFECTS_SCHEMA
    assert table.height == len(model_shape(planted_model).heads)
    assert (table["method"] == "mask").all() and (table["probe"] == "probe-x").all()
    assert (table["model"] == "planted").all() and (table["n_items"] == len(planted_items)).all()
    assert table["effect"].is_between(0.0, 1.0).all()


def test_same_seed_same_masks_and_circuit_order(planted_model, planted_items):
    cfg = MaskConfig(steps=10, seed=3)
    first = mask_effects(planted_model, planted_items, cfg, "planted", "planted", batch_size=4)
    again = mask_effects(planted_model, planted_items, cfg, "planted", "planted", batch_size=4)
    assert first.equals(again)
    ranked = mask_circuit(first)
    masks = {(layer, head): m for layer, head, m in first.select("layer", "head", "effect").iter_rows()}
    values = [masks[h] for h in ranked]
    assert values == sorted(values, reverse=True) and all(v >= 0.5 for v in values)


def test_model_is_left_as_it_was(planted_model, planted_items):
    params = dict(planted_model.named_parameters())
    original = {name: p.requires_grad for name, p in params.items()}
    before = {name: p.detach().clone() for name, p in params.items()}
    # A mix of flags, so that restoring them (not just setting all True or False) is what is checked.
    flags = {name: i % 2 == 0 for i, name in enumerate(params)}
    for name, p in params.items():
        p.requires_grad_(flags[name])
    try:
        mask_effects(planted_model, planted_items, MaskConfig(steps=5), "planted", "planted", batch_size=8)
        for name, p in planted_model.named_parameters():
            assert p.requires_grad == flags[name], name
            assert torch.equal(p.detach(), before[name]), name
            assert p.grad is None, name
    finally:
        for name, p in params.items():
            p.requires_grad_(original[name])


def test_temperature_is_annealed_from_start_to_end():
    cfg = MaskConfig(steps=11, t_start=2.0, t_end=0.02)
    schedule = [temperature(step, cfg) for step in range(cfg.steps)]
    assert schedule[0] == pytest.approx(2.0) and schedule[-1] == pytest.approx(0.02)
    assert all(a > b for a, b in zip(schedule, schedule[1:], strict=False))


@pytest.mark.parametrize(
    ("field", "value"),
    [("lr", 0.0), ("steps", 0), ("l1_penalty", -0.1), ("t_start", 0.0), ("t_end", -1.0), ("logit_init", 0.0)],
)
def test_bad_values_are_rejected_naming_the_field(tmp_path, field, value):
    with pytest.raises(ValidationError, match=field):
        MaskConfig(**{field: value})
    raw = tiny_config_dict(tmp_path)
    raw["circuits"] = {"mask": {field: value}}
    with pytest.raises(ConfigError, match=rf"circuits\.mask\.{field}"):
        parse_config(raw)


def test_temperature_must_anneal_down(tmp_path):
    raw = tiny_config_dict(tmp_path)
    raw["circuits"] = {"mask": {"t_start": 0.1, "t_end": 0.5}}
    with pytest.raises(ConfigError, match=r"circuits\.mask\.t_end: 0\.5 must be <= t_start=0\.1"):
        parse_config(raw)


def test_bad_inputs_are_clear_errors_and_no_behaviour_is_no_circuit(planted_model, planted_items):
    swapped = [
        ProbeItem(it.probe, it.corrupt_ids, it.clean_ids, it.correct_id, it.wrong_id, "", "")
        for it in planted_items
    ]
    # A model that does not do the task (here: prompts swapped) has nothing to keep: an empty circuit.
    with pytest.warns(UserWarning, match="mean LD_clean - LD_corrupt is .* every mask is 0"):
        table = mask_effects(planted_model, swapped, FAST, "planted", "planted")
    assert (table["effect"] == 0).all() and mask_circuit(table) == []
    with pytest.raises(ValueError, match="no probe items"):
        mask_effects(planted_model, [], FAST, "planted", "planted")
    with pytest.raises(ValueError, match="heads repeat"):
        mask_effects(planted_model, planted_items, FAST, "planted", "planted", heads=[(0, 1), (0, 1)])
    with pytest.raises(ValueError, match=r"head \(3, 0\) does not exist"):
        mask_effects(planted_model, planted_items, FAST, "planted", "planted", heads=[(3, 0)])


def test_the_pipeline_learns_one_mask_over_all_heads(planted_model, planted_items, tmp_path):
    """`mask` in patching.methods: one work item per (model, probe) over every head, never chunked, with
    the same table as mask_effects and one pseudo-item whose ratio is the mask."""
    from dcv.circuits.pipeline import build_work_items, compute_item
    from dcv.results import build_results_table
    from dcv.tables import EFFECTS_SCHEMA

    raw = tiny_config_dict(tmp_path)
    raw["patching"].update(methods=["exact", "mask"], head_chunk_size=4)
    raw["circuits"]["mask"] = {"steps": 60}
    cfg = parse_config(raw)
    work = build_work_items(cfg, build_results_table([]), ["ioi"])
    masks = work.filter(pl.col("method") == "mask")
    total = masks["n_layers"][0] * masks["n_heads"][0]  # the config's tiny model
    assert masks.height == 1 and (masks["head_start"][0], masks["head_end"][0]) == (0, total)
    assert work.filter(pl.col("method") == "exact").height == -(-total // 4)
    # The same item on the planted model: every one of its heads.
    shape = model_shape(planted_model)
    n_heads = shape.n_layers * shape.n_heads
    item = {
        **masks.row(0, named=True),
        "n_layers": shape.n_layers,
        "n_heads": shape.n_heads,
        "head_end": n_heads,
    }
    rows = compute_item(planted_model, planted_items, item, cfg)
    assert rows.schema == EFFECTS_SCHEMA and rows.height == n_heads
    direct = mask_effects(planted_model, planted_items, cfg.circuits.mask, "base", "ioi", batch_size=16)
    assert rows["effect"].to_list() == pytest.approx(direct["effect"].to_list())
    assert set(mask_circuit(rows)) == PLANTED
    assert (rows["item_delta"].list.first() == rows["effect"]).all()
