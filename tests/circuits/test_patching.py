from __future__ import annotations

import pytest
import torch

from dcv.circuits.decoder import model_shape
from dcv.circuits.patching import head_effects, item_effects, item_table
from dcv.tables import HEAD_EFFECTS_SCHEMA
from tests.helpers import bridge_of, naive_patched_deltas


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
    assert table.schema == HEAD_EFFECTS_SCHEMA
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


def riemann_integrated_gradients(model, item, steps: int) -> torch.Tensor:
    """delta [n_heads] of one item by the textbook sum, on the HF model's own forward (not dcv's decoder):

        delta_h = (z_h(clean) - z_h(corrupt)) . (1/steps) sum_{k=1..steps} dLD/dz_h at e_k,
        e_k = e(corrupt) + k/steps (e(clean) - e(corrupt)),

    with z a layer's o_proj input [pos, n_heads * d_head] (head h's slice is its hook_z) and e the input
    embeddings. The gradient is taken by a zero tensor added to z: the total derivative through later layers.
    """
    shape = model_shape(model)
    projections = [layer.self_attn.o_proj for layer in model.model.layers]
    clean, corrupt = torch.tensor([item.clean_ids]), torch.tensor([item.corrupt_ids])

    def forward(embeds, leaves=None):
        zs, handles = [], []
        for layer, projection in enumerate(projections):

            def add_leaf(module, args, layer=layer):
                z = args[0] if leaves is None else args[0] + leaves[layer]
                zs.append(z)
                return (z,)

            handles.append(projection.register_forward_pre_hook(add_leaf))
        try:
            logits = model(inputs_embeds=embeds).logits[0, -1]
        finally:
            for handle in handles:
                handle.remove()
        return logits[item.correct_id] - logits[item.wrong_id], zs

    embed = model.model.embed_tokens
    with torch.no_grad():
        e_clean, e_corrupt = embed(clean), embed(corrupt)
        _, z_clean = forward(e_clean)
        _, z_corrupt = forward(e_corrupt)
    mean_grad = [torch.zeros_like(z) for z in z_clean]
    for k in range(1, steps + 1):
        leaves = [torch.zeros_like(z, requires_grad=True) for z in z_clean]
        ld, _ = forward(e_corrupt + k / steps * (e_clean - e_corrupt), leaves)
        for total, grad in zip(mean_grad, torch.autograd.grad(ld, leaves), strict=True):
            total += grad / steps
    d = shape.d_head
    return torch.stack(
        [
            (mean_grad[layer] * (z_clean[layer] - z_corrupt[layer]))[..., head * d : (head + 1) * d].sum()
            for layer, head in shape.heads
        ]
    )


def test_integrated_gradients_is_the_riemann_sum_of_its_definition(tiny_model, ioi_items):
    attribution = item_effects(tiny_model, ioi_items, "attribution", batch_size=5)
    one_step = item_effects(tiny_model, ioi_items, "ig", ig_steps=1, batch_size=5)
    assert torch.allclose(attribution.delta, one_step.delta)
    for steps in (1, 4):
        ig = item_effects(tiny_model, ioi_items, "ig", ig_steps=steps, batch_size=5)
        expected = torch.stack(
            [riemann_integrated_gradients(tiny_model, it, steps) for it in ioi_items], dim=1
        )
        assert torch.allclose(ig.delta, expected, rtol=1e-3, atol=1e-5), (ig.delta - expected).abs().max()
        assert expected.abs().max() > 1e-2  # not a comparison between zeros
    # More steps is a different estimate (the gradient changes along the path), not the same number.
    assert (ig.delta - one_step.delta).abs().max() > 1e-2 * one_step.delta.abs().max()


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
