from __future__ import annotations

import copy

import pytest
import torch

from dcv.config import ProbeConfig
from dcv.tasks.probes import build_probe


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


@pytest.fixture(scope="module")
def ioi_items(tokenizer):
    return build_probe(ProbeConfig(name="ioi", n_items=12, seed=0), tokenizer).items


@pytest.fixture(scope="module")
def capitals_items(tokenizer):
    return build_probe(ProbeConfig(name="capitals", n_items=12, seed=0), tokenizer).items
