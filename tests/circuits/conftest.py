from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dcv.circuits.decoder import model_shape, run_decoder
from dcv.config import ProbeConfig, TargetTaskConfig, TinyModelConfig
from dcv.tasks.items import ProbeItem
from dcv.tasks.probes import build_probe
from tests.helpers import PLANTED


@pytest.fixture(scope="module")
def ioi_items(tokenizer):
    return build_probe(ProbeConfig(name="ioi", n_items=12, seed=0), tokenizer, TargetTaskConfig()).items


@pytest.fixture(scope="module")
def capitals_items(tokenizer):
    return build_probe(ProbeConfig(name="capitals", n_items=12, seed=0), tokenizer, TargetTaskConfig()).items


VOCAB, LENGTH, CHANGED = 64, 8, 3  # prompts of 8 random tokens; the corrupted one changes position 3


@pytest.fixture(scope="module")
def planted_model() -> LlamaForCausalLM:
    """The tests' tiny Llama (TinyModelConfig's shape, 3 layers, a 64-token vocabulary) in which only
    PLANTED heads write to the residual stream: every other head's o_proj columns are zero."""
    tiny = TinyModelConfig(num_layers=3)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_kv_heads,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.set_attn_implementation("eager")
    d_head = model_shape(model).d_head
    with torch.no_grad():
        for layer, block in enumerate(model.model.layers):
            for head in range(tiny.num_heads):
                if (layer, head) not in PLANTED:
                    block.self_attn.o_proj.weight[:, head * d_head : (head + 1) * d_head] = 0
    return model.eval()


@pytest.fixture(scope="module")
def planted_items(planted_model) -> list[ProbeItem]:
    """Contrast pairs whose answer only the planted heads can carry.

    The corrupted prompt changes a token before the last position, and only attention moves information
    between positions, so the clean-vs-corrupted difference at the last position flows through PLANTED
    heads alone. The answer tokens are the ones that difference moves most (correct = most raised by the
    clean prompt, wrong = most lowered), so LD_clean - LD_corrupt is large for every item.
    """
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(0, VOCAB, (16, LENGTH), generator=generator)
    corrupt = clean.clone()
    corrupt[:, CHANGED] = (clean[:, CHANGED] + torch.randint(1, VOCAB, (16,), generator=generator)) % VOCAB
    with torch.no_grad():
        moved = run_decoder(planted_model, clean) - run_decoder(planted_model, corrupt)  # [16, vocab]
    return [
        ProbeItem("planted", tuple(c.tolist()), tuple(k.tolist()), int(up), int(down), "", "")
        for c, k, up, down in zip(clean, corrupt, moved.argmax(-1), moved.argmin(-1), strict=True)
    ]
