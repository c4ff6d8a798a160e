from __future__ import annotations

import pytest
import torch

from dcv.circuits.decoder import model_shape
from dcv.circuits.patching import EFFECT_SCHEMA, head_effects, item_effects, item_table
from tests.circuits.conftest import bridge_of, naive_patched_deltas


@pytest.mark.parametrize("probe", ["ioi_items", "capitals_items"])
def test_exact_equals_the_naive_per_head_loop(tiny_model, tokenizer, probe, request):
    items = request.getfixturevalue(probe)
    heads = model_shape(tiny_model).heads
    fast = item_effects(tiny_model, items, "exact", batch_size=5, head_chunk_size=3)
    naive = naive_patched_deltas(bridge_of(tiny_model, tokenizer), items, heads)
    assert torch.allclose(fast.delta, naive, atol=1e-4)
    assert fast.delta.abs().max() > 1e-3  # the comparison is not between zeros


def test_exact_equals_transformer_lens_patching_utility(tiny_model, tokenizer, ioi_items):
    from transformer_lens import patching

    length = len(ioi_items[0].clean_ids)
    items = [it for it in ioi_items if len(it.clean_ids) == length]  # the utility takes one unpadded batch
    clean, corrupt = (
        torch.tensor([it.clean_ids for it in items]),
        torch.tensor([it.corrupt_ids for it in items]),
    )
    rows = torch.arange(len(items))
    correct, wrong = (
        torch.tensor([it.correct_id for it in items]),
        torch.tensor([it.wrong_id for it in items]),
    )

    def mean_ld(logits):
        return (logits[rows, -1, correct] - logits[rows, -1, wrong]).mean()

    bridge = bridge_of(tiny_model, tokenizer)
    _, corrupt_cache = bridge.run_with_cache(corrupt)
    patched = patching.get_act_patch_attn_head_out_all_pos(
        bridge, clean, corrupt_cache, mean_ld
    )  # [layer, head]
    with torch.no_grad():
        expected = mean_ld(bridge(clean)) - patched.flatten()
    fast = item_effects(tiny_model, items, "exact")
    assert torch.allclose(fast.delta.mean(dim=1), expected, atol=1e-4)


def test_effects_table_shape_and_values(tiny_model, ioi_items):
    table = head_effects(tiny_model, ioi_items, "tiny", "ioi", "exact", batch_size=4)
    shape = model_shape(tiny_model)
    assert table.schema == EFFECT_SCHEMA
    assert table.height == shape.n_layers * shape.n_heads
    assert set(zip(table["layer"], table["head"], strict=True)) == set(shape.heads)
    assert (table["n_items"] == len(ioi_items)).all() and (table["probe"] == "ioi").all()
    assert table["effect"].is_finite().all() and table["effect"].n_unique() > 1


def test_effect_is_ratio_of_means(tiny_model, ioi_items):
    parts = item_effects(tiny_model, ioi_items, "exact")
    table = item_table(parts)
    assert table.height == len(parts.heads) * len(ioi_items)
    first = table.filter((table["layer"] == 0) & (table["head"] == 0))
    assert first["delta"].mean() / first["denominator"].mean() == pytest.approx(
        float(parts.effects()[0]), rel=1e-5
    )


def test_attribution_is_integrated_gradients_with_one_step(tiny_model, ioi_items):
    attribution = item_effects(tiny_model, ioi_items, "attribution")
    one_step = item_effects(tiny_model, ioi_items, "ig", ig_steps=1)
    assert torch.allclose(attribution.delta, one_step.delta)
    ig = item_effects(tiny_model, ioi_items, "ig", ig_steps=4)
    assert not torch.allclose(attribution.delta, ig.delta)
    assert torch.isfinite(ig.delta).all() and ig.delta.abs().max() > 0


def test_attribution_ranks_heads_like_exact(tiny_model, ioi_items):
    exact = item_effects(tiny_model, ioi_items, "exact").effects()
    attribution = item_effects(tiny_model, ioi_items, "attribution").effects()
    ranks = torch.stack([exact.argsort().argsort(), attribution.argsort().argsort()]).float()
    assert torch.corrcoef(ranks)[0, 1] > 0.5


def test_bad_inputs_are_clear_errors(tiny_model, ioi_items):
    with pytest.raises(ValueError, match="unknown; choose one of exact, attribution, ig"):
        item_effects(tiny_model, ioi_items, "guess")
    with pytest.raises(ValueError, match=r"head \(5, 0\) does not exist"):
        item_effects(tiny_model, ioi_items, "exact", heads=[(5, 0)])
    with pytest.raises(ValueError, match="no probe items"):
        item_effects(tiny_model, [], "exact")
