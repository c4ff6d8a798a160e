"""Exact patching on the real SmolLM2-135M-Instruct equals the obvious per-head loop (on ioi: the loop costs
~30 s a probe; both probes' items against the loop on the tiny model: tests/circuits/test_patching.py)."""

from __future__ import annotations

import pytest
import torch

from dcv.circuits.decoder import model_shape
from dcv.circuits.patching import item_effects
from dcv.config import ProbeConfig, TargetTaskConfig
from dcv.tasks.probes import build_probe
from tests.helpers import bridge_of, naive_patched_deltas


@pytest.mark.parametrize("probe", ["ioi"])
def test_exact_equals_naive_loop_on_smollm2(smollm2, probe):
    model, tokenizer = smollm2
    items = build_probe(ProbeConfig(name=probe, n_items=4, seed=0), tokenizer, TargetTaskConfig()).items
    # Every layer, a different head in each: the loop costs one full forward per (head, item).
    shape = model_shape(model)
    heads = [(layer, (layer * 4) % shape.n_heads) for layer in range(shape.n_layers)]
    fast = item_effects(model, items, "exact", heads=heads, batch_size=4)
    naive = naive_patched_deltas(bridge_of(model, tokenizer), items, heads)
    assert torch.allclose(fast.delta, naive, atol=1e-4), float((fast.delta - naive).abs().max())
    assert fast.delta.abs().max() > 0.1
