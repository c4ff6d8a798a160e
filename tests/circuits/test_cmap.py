"""Cross-model activation patching (method ``cmap``) on the tiny model: closed forms on planted models.

cmap swaps a head's *output*, z_h @ W_O[:, h].T with each model's own o_proj, at ``hook_attn_out``. Which
heads can have cmap != 0 follows from which heads' weights or inputs differ between the two models; each
test says it.
"""

from __future__ import annotations

import copy

import polars as pl
import pytest
import torch

from dcv.calibration import plant_damage
from dcv.circuits.decoder import DecoderCache, model_shape, run_decoder
from dcv.circuits.patching import cmap_item_effects, item_effects
from dcv.circuits.pipeline import compute_cmap_item
from dcv.circuits.weight_change import head_weight_change, model_attention
from dcv.config import CMAP_DIRECTIONS
from dcv.evaluation import probe_logit_diffs
from dcv.tables import CMAP_SCHEMA


def cmap_values(base, checkpoint, items) -> dict[str, torch.Tensor]:
    """{direction: cmap [n_layers, n_heads]}."""
    shape = model_shape(base)
    effects = cmap_item_effects(base, checkpoint, items, batch_size=5, head_chunk_size=3)
    return {d: e.effects().view(shape.n_layers, shape.n_heads) for d, e in effects.items()}


def test_a_checkpoint_equal_to_base_has_cmap_zero_for_every_head_and_direction(tiny_model, ioi_items):
    values = cmap_values(tiny_model, copy.deepcopy(tiny_model), ioi_items)
    assert set(values) == set(CMAP_DIRECTIONS)
    for direction, cmap in values.items():
        assert cmap.abs().max() < 1e-6, direction


def test_the_denominator_is_the_base_gap_in_both_directions(tiny_model, ioi_items):
    planted = plant_damage(copy.deepcopy(tiny_model), [(0, 1)], 0.0)
    effects = cmap_item_effects(tiny_model, planted, ioi_items, batch_size=5)
    base_gap = item_effects(tiny_model, ioi_items, "exact", heads=[(0, 0)]).denominator
    for direction in CMAP_DIRECTIONS:
        assert torch.allclose(effects[direction].denominator, base_gap, atol=1e-5)


@pytest.mark.parametrize("layer", [0, 1])
def test_one_heads_o_proj_zeroed_gives_that_head_the_whole_change_in_closed_form(
    tiny_model, ioi_items, layer
):
    """Checkpoint = base with head (layer, 1)'s o_proj input columns zeroed (calibration's ablation); the
    two models differ in nothing else.

    ckpt_into_base: the base with that head's output taken from the checkpoint (zero) *is* the checkpoint,
    so delta_i = LD_base_i - LD_ckpt_i. base_into_ckpt: the checkpoint with the base's output of that head
    *is* the base, so delta_i = LD_ckpt_i - LD_base_i. Every other head of that layer or an earlier one has
    the same z and o_proj columns in both models: cmap 0 (to float rounding). Heads of later layers read
    the changed residual stream, so in the last layer (1 of 2) the planted head is the only one with
    cmap != 0, hence the largest."""
    head = 1
    planted = plant_damage(copy.deepcopy(tiny_model), [(layer, head)], 0.0)
    effects = cmap_item_effects(tiny_model, planted, ioi_items, batch_size=5, head_chunk_size=3)
    change = probe_logit_diffs(tiny_model, ioi_items, 5) - probe_logit_diffs(planted, ioi_items, 5)
    assert change.abs().mean() > 1e-3  # the ablation matters to the base
    shape = model_shape(tiny_model)
    row = shape.heads.index((layer, head))
    expected = {"ckpt_into_base": change, "base_into_ckpt": -change}
    for direction, item_parts in effects.items():
        assert torch.allclose(item_parts.delta[row], expected[direction], atol=1e-5), direction
        cmap = item_parts.effects().view(shape.n_layers, shape.n_heads)
        others = [h for h in range(shape.n_heads) if h != head]
        assert cmap[layer, others].abs().max() < 1e-6, direction
        assert (cmap[:layer].abs() < 1e-6).all(), direction
        if layer == shape.n_layers - 1:
            assert cmap.abs().argmax().item() == row, direction


def test_weights_moved_where_the_probe_never_reads_give_big_weight_change_and_zero_cmap(
    tiny_model, ioi_items
):
    """Head (0, 2)'s o_proj columns are zero in both models and only its q rows move in the checkpoint:
    its z changes, but its output (z times zero columns) is zero in both, so no other head's input
    changes. Weight change calls it the most changed head; cmap is 0 for it and every other head."""
    layer, head = 0, 2
    base = plant_damage(copy.deepcopy(tiny_model), [(layer, head)], 0.0)
    tuned = copy.deepcopy(base)
    d_head = model_shape(base).d_head
    with torch.no_grad():
        q = tuned.model.layers[layer].self_attn.q_proj.weight
        rows = slice(head * d_head, (head + 1) * d_head)
        q[rows] += (
            torch.randn(q[rows].shape, generator=torch.Generator().manual_seed(0)) * q[rows].abs().mean() * 5
        )
    change = head_weight_change(model_attention(base), model_attention(tuned), 1e-6, False)
    moved = change.filter((pl.col("layer") == layer) & (pl.col("head") == head)).row(0, named=True)
    assert moved["q_change"] > 1.0 and moved["change"] > 0.3
    assert change.filter(pl.col("change") > 0).height == 1  # only that head moved
    # The moved head's z really differs (so cmap ~ 0 is not a comparison of equal activations).
    ids = torch.tensor([ioi_items[0].clean_ids])
    a, b = DecoderCache(), DecoderCache()
    with torch.no_grad():
        run_decoder(base, ids, cache=a)
        run_decoder(tuned, ids, cache=b)
    assert (a.z[layer][:, :, head] - b.z[layer][:, :, head]).abs().max() > 1e-3
    for direction, cmap in cmap_values(base, tuned, ioi_items).items():
        assert cmap.abs().max() < 1e-6, direction


def test_compute_cmap_item_rows(tiny_model, ioi_items, tiny_config):
    cfg = tiny_config.model_copy(
        update={"patching": tiny_config.patching.model_copy(update={"batch_size": 5})}
    )
    planted = plant_damage(copy.deepcopy(tiny_model), [(0, 1)], 0.0)
    shape = model_shape(tiny_model)
    item = {"model": "t@1", "trial": "t", "step": 1, "checkpoint": "x", "probe": "ioi", "method": "cmap"}
    item |= {"head_start": 2, "head_end": 7, "n_layers": shape.n_layers, "n_heads": shape.n_heads}
    rows = compute_cmap_item(tiny_model, planted, ioi_items, item, cfg)
    assert rows.schema == CMAP_SCHEMA and rows.height == 2 * 5
    assert rows["direction"].to_list() == [d for d in CMAP_DIRECTIONS for _ in range(5)]
    assert (rows["method"] == "cmap").all() and (rows["n_items"] == len(ioi_items)).all()
    values = cmap_values(tiny_model, planted, ioi_items)
    for row in rows.iter_rows(named=True):
        expected = values[row["direction"]][row["layer"], row["head"]].item()
        assert row["effect"] == pytest.approx(expected, abs=1e-6)
        parts = sum(row["item_delta"]) / sum(row["item_denominator"])
        assert parts == pytest.approx(row["effect"], rel=1e-6)  # effect in float32


def test_compute_cmap_item_on_an_explicit_head_list(tiny_model, ioi_items, tiny_config):
    """An item with head_index (cmap on the base's top heads) patches those heads only, each as the
    full computation gives it."""
    planted = plant_damage(copy.deepcopy(tiny_model), [(0, 1)], 0.0)
    shape = model_shape(tiny_model)
    index = [1, 5, shape.n_heads * shape.n_layers - 1]  # not a range: heads of both layers
    item = {"model": "t@1", "trial": "t", "step": 1, "checkpoint": "x", "probe": "ioi", "method": "cmap"}
    item |= {"head_start": 1, "head_end": index[-1] + 1, "n_layers": shape.n_layers, "n_heads": shape.n_heads}
    rows = compute_cmap_item(tiny_model, planted, ioi_items, item | {"head_index": index}, tiny_config)
    heads = [divmod(i, shape.n_heads) for i in index]
    assert rows.height == 2 * len(index)
    assert list(zip(rows["layer"], rows["head"], strict=True)) == heads * 2
    values = cmap_values(tiny_model, planted, ioi_items)
    for row in rows.iter_rows(named=True):
        expected = values[row["direction"]][row["layer"], row["head"]].item()
        assert row["effect"] == pytest.approx(expected, abs=1e-6)


def test_cmap_on_top_heads_takes_each_circuit_methods_top_heads_of_the_base(tiny_config, tmp_path):
    """patching.cmap_top_heads N: one item per checkpoint and probe on the union of every circuit
    method's top N base heads by |effect| (a negative effect counts by its size); other models' effects
    and the cmap rows themselves are never ranked."""
    from dcv.circuits.pipeline import WORK_SCHEMA, cmap_on_top_heads, item_heads, model_items

    cfg = tiny_config.model_copy(
        update={
            "patching": tiny_config.patching.model_copy(
                update={"methods": ["attribution", "mask", "cmap"], "cmap_top_heads": 2}
            ),
            "storage": tiny_config.storage.model_copy(update={"root": str(tmp_path)}),
        }
    )
    shape = (2, 4)
    effects = {
        ("base", "attribution"): [0.1, -0.9, 0.0, 0.2, 0.0, 0.5, 0.0, 0.0],  # top 2: (0, 1), (1, 1)
        ("base", "mask"): [0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 0.0, 0.8],  # top 2: (1, 3), (1, 1)
        ("sft@4", "attribution"): [9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0],  # never ranked
    }
    rows = [
        {"model": m, "probe": "ioi", "method": method, "layer": i // 4, "head": i % 4, "effect": e}
        for (m, method), values in effects.items()
        for i, e in enumerate(values)
    ]
    work = pl.DataFrame(
        model_items(cfg, tmp_path, ("sft@4", "sft", 4, "ckpt"), shape, "ioi", "cmap")
        + model_items(cfg, tmp_path, ("rl@4", "rl", 4, "ckpt2"), shape, "ioi", "cmap"),
        schema=WORK_SCHEMA,
    )
    top = cmap_on_top_heads(cfg, work, pl.DataFrame(rows))
    assert top["model"].to_list() == ["sft@4", "rl@4"] and set(top["probe"]) == {"ioi"}
    for item in top.iter_rows(named=True):
        assert item_heads(item) == [(0, 1), (1, 1), (1, 3)]
        assert item["n_rows"] == 2 * 3 and "__cmap__top3__" in item["item_id"]
    assert top["item_id"].n_unique() == 2 and not set(top["item_id"]) & set(work["item_id"])
    unset = cfg.model_copy(update={"patching": cfg.patching.model_copy(update={"cmap_top_heads": None})})
    assert cmap_on_top_heads(unset, work, pl.DataFrame(rows)).equals(work)
