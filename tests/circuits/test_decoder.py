from __future__ import annotations

import pytest
import torch

from dcv.circuits.decoder import DecoderCache, Prefix, check_heads, hook_z_name, model_shape, run_decoder
from dcv.config import ModelConfig, TinyModelConfig
from dcv.models import load_model
from tests.helpers import bridge_of


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def family_model(request, tiny_model, tokenizer):
    """The tiny model of each family the decoder re-states: SmolLM2's (llama) and the paper model's (qwen2:
    q/k/v biases, 8:1 GQA as Qwen2.5-3B's 16:2)."""
    if request.param == "llama":
        return tiny_model
    tiny = TinyModelConfig(architecture="qwen2", num_heads=8, num_kv_heads=1, hidden_size=64)
    model = load_model(ModelConfig(name="tiny", tiny=tiny), tokenizer)
    assert model.config.model_type == "qwen2" and model.model.layers[0].self_attn.q_proj.bias is not None
    with torch.no_grad():  # biases start at zero: make them matter, so a decoder that dropped them fails
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    return model


def test_hook_names_are_transformer_lens_names(tiny_model, tokenizer):
    bridge = bridge_of(tiny_model, tokenizer)
    shape = model_shape(tiny_model)
    assert [hook_z_name(layer) for layer in range(shape.n_layers)] == [
        f"blocks.{layer}.attn.hook_z" for layer in range(shape.n_layers)
    ]
    assert all(hook_z_name(layer) in bridge.hook_dict for layer in range(shape.n_layers))


def test_full_pass_matches_the_hf_model(family_model, ioi_items):
    ids = torch.tensor([ioi_items[0].clean_ids, ioi_items[0].corrupt_ids])
    with torch.inference_mode():
        expected = family_model(ids).logits[:, -1]
        assert torch.allclose(run_decoder(family_model, ids), expected, atol=1e-5)


def test_z_matches_the_bridge_hook_z(family_model, tokenizer, ioi_items):
    ids = torch.tensor([ioi_items[0].clean_ids])
    cache = DecoderCache()
    with torch.inference_mode():
        run_decoder(family_model, ids, cache=cache)
    _, bridge_cache = bridge_of(family_model, tokenizer).run_with_cache(ids)
    for layer, z in enumerate(cache.z):
        assert z.shape == bridge_cache[hook_z_name(layer)].shape  # [batch, pos, head, d_head]
        assert torch.allclose(z, bridge_cache[hook_z_name(layer)], atol=1e-5)


def test_resuming_from_a_layer_and_position_is_exact(family_model, ioi_items):
    ids = torch.tensor([ioi_items[0].clean_ids, ioi_items[1].clean_ids[: len(ioi_items[0].clean_ids)]])
    cache = DecoderCache()
    with torch.inference_mode():
        full = run_decoder(family_model, ids, cache=cache)
        for layer in range(len(cache.resid_pre)):
            for start in (1, 5, ids.shape[1] - 1):
                prefix = Prefix(
                    [k[:, :, :start] for k in cache.keys], [v[:, :, :start] for v in cache.values]
                )
                resumed = run_decoder(
                    family_model,
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
