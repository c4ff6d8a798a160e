"""The real SmolLM2-135M-Instruct: the probes measure capabilities the base model has."""

from __future__ import annotations

import pytest
import torch

from dcv.config import load_config
from dcv.evaluation import evaluate_probe, probe_logit_diffs
from dcv.tasks.probes import build_probe
from tests.helpers import DEMO_CONFIG


@pytest.mark.parametrize("name", ["ioi", "capitals", "greater_than", "induction"])
def test_base_model_solves_the_demo_probes(smollm2, name):
    model, tokenizer = smollm2
    cfg = load_config(DEMO_CONFIG)
    # 64 items whatever the demo's (smaller) probe size, so the accuracy bound means something.
    probe = build_probe(cfg.probe(name).model_copy(update={"n_items": 64}), tokenizer, cfg.target_task)
    assert len(probe) >= 40
    score = evaluate_probe(model, probe, batch_size=32)
    assert score.accuracy >= 0.7, score
    # The corruption removes the information: the clean LD must beat the corrupted one on most items.
    clean = torch.tensor(score.ld)  # evaluate_probe's own clean LDs (probe_logit_diffs), not computed twice
    corrupt = probe_logit_diffs(model, probe.items, 32, corrupted=True)
    assert (clean > corrupt).float().mean() >= 0.8
    assert float(clean.mean() - corrupt.mean()) > 2.0
