from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dcv.circuits.decoder import model_shape, run_decoder
from dcv.config import ExperimentConfig, ProbeConfig, TargetTaskConfig, TinyModelConfig, parse_config
from dcv.tasks.items import ProbeItem
from dcv.tasks.probes import build_probe
from tests.conftest import tiny_config_dict


def bridge_of(model, tokenizer):
    """A TransformerLens bridge on a copy: booting it replaces the model's modules in place."""
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers("dcv-test", hf_model=copy.deepcopy(model), tokenizer=tokenizer)


def naive_patched_deltas(bridge, items, heads) -> torch.Tensor:
    """The obvious loop: for every item and head, one forward with that head's hook_z from the corrupted run.

    Returns delta [head, item] = LD_clean - LD_patched.
    """
    delta = torch.empty(len(heads), len(items))
    with torch.no_grad():
        for i, item in enumerate(items):
            clean, corrupt = torch.tensor([item.clean_ids]), torch.tensor([item.corrupt_ids])
            _, cache = bridge.run_with_cache(corrupt, names_filter=lambda name: name.endswith("attn.hook_z"))
            logits = bridge(clean)[0, -1]
            ld_clean = logits[item.correct_id] - logits[item.wrong_id]
            for row, (layer, head) in enumerate(heads):
                name = f"blocks.{layer}.attn.hook_z"

                def patch(z, hook, name=name, head=head, cache=cache):
                    z = z.clone()
                    z[:, :, head] = cache[name][:, :, head]
                    return z

                patched = bridge.run_with_hooks(clean, fwd_hooks=[(name, patch)])[0, -1]
                delta[row, i] = ld_clean - (patched[item.correct_id] - patched[item.wrong_id])
    return delta


def chem_configs(storage: Path) -> tuple[ExperimentConfig, ExperimentConfig]:
    """Two tiny configs probing ioi and chem that differ only in target_task.seed."""
    raw = tiny_config_dict(storage)
    raw["probes"] = [{"name": "ioi", "n_items": 8, "seed": 0}, {"name": "chem", "n_items": 8, "seed": 0}]
    raw["target_task"]["answer_format"] = "letter"  # chem compares answer letters
    other = copy.deepcopy(raw)
    other["target_task"]["seed"] = raw["target_task"]["seed"] + 1
    return parse_config(raw), parse_config(other)


@pytest.fixture(scope="module")
def ioi_items(tokenizer):
    return build_probe(ProbeConfig(name="ioi", n_items=12, seed=0), tokenizer, TargetTaskConfig()).items


@pytest.fixture(scope="module")
def capitals_items(tokenizer):
    return build_probe(ProbeConfig(name="capitals", n_items=12, seed=0), tokenizer, TargetTaskConfig()).items


PLANTED = {(0, 1), (1, 2), (1, 3), (2, 0)}
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
