from __future__ import annotations

import pytest
import torch

from dcv.circuits.decoder import DecoderCache, Prefix, check_heads, hook_z_name, model_shape, run_decoder
from tests.helpers import bridge_of


def test_hook_names_are_transformer_lens_names(tiny_model, tokenizer):
    bridge = bridge_of(tiny_model, tokenizer)
    shape = model_shape(tiny_model)
    assert [hook_z_name(layer) for layer in range(shape.n_layers)] == [
        f"blocks.{layer}.attn.hook_z" for layer in range(shape.n_layers)
    ]
    assert all(hook_z_name(layer) in bridge.hook_dict for layer in range(shape.n_layers))


def test_full_pass_matches_the_hf_model(tiny_model, ioi_items):
    ids = torch.tensor([ioi_items[0].clean_ids, ioi_items[0].corrupt_ids])
    with torch.inference_mode():
        expected = tiny_model(ids).logits[:, -1]
        assert torch.allclose(run_decoder(tiny_model, ids), expected, atol=1e-5)


def test_z_matches_the_bridge_hook_z(tiny_model, tokenizer, ioi_items):
    ids = torch.tensor([ioi_items[0].clean_ids])
    cache = DecoderCache()
    with torch.inference_mode():
        run_decoder(tiny_model, ids, cache=cache)
    _, bridge_cache = bridge_of(tiny_model, tokenizer).run_with_cache(ids)
    for layer, z in enumerate(cache.z):
        assert z.shape == bridge_cache[hook_z_name(layer)].shape  # [batch, pos, head, d_head]
        assert torch.allclose(z, bridge_cache[hook_z_name(layer)], atol=1e-5)


def test_resuming_from_a_layer_and_position_is_exact(tiny_model, ioi_items):
    ids = torch.tensor([ioi_items[0].clean_ids, ioi_items[1].clean_ids[: len(ioi_items[0].clean_ids)]])
    cache = DecoderCache()
    with torch.inference_mode():
        full = run_decoder(tiny_model, ids, cache=cache)
        for layer in range(len(cache.resid_pre)):
            for start in (1, 5, ids.shape[1] - 1):
                prefix = Prefix(
                    [k[:, :, :start] for k in cache.keys], [v[:, :, :start] for v in cache.values]
                )
                resumed = run_decoder(
                    tiny_model,
                    hidden=cache.resid_pre[layer][:, start:],
                    start_layer=layer,
                    start_pos=start,
                    prefix=prefix,
                )
                assert torch.allclose(resumed, full, atol=1e-5), (layer, start)


def test_bad_heads_and_models_are_clear_errors(tiny_model):
    with pytest.raises(ValueError, match=r"head \(2, 0\) does not exist: the model has 2 layers x 4 heads"):
        check_heads(tiny_model, [(0, 0), (2, 0)])
    with pytest.raises(ValueError, match=r"head \(0, 4\)"):
        check_heads(tiny_model, [(0, 4)])
    with pytest.raises(ValueError, match="needs input_ids"):
        run_decoder(tiny_model)
