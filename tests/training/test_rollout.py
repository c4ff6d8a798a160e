"""Rollout actors and weight sync, on a real local Ray with the tiny model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray
import torch

from dcv.config import parse_config
from dcv.models import load_model
from dcv.training.grpo import make_rollout_func
from dcv.training.rollout import RolloutPool, StaleWeightsError
from tests.conftest import tiny_config_dict


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    raw = tiny_config_dict(tmp_path_factory.mktemp("rollout"))
    raw["rl"]["rollout"] = {"backend": "hf", "num_actors": 2, "num_cpus": 1}
    raw["rl"].update(max_completion_length=6, num_generations=4, per_device_batch_size=4)
    return parse_config(raw)


@pytest.fixture(scope="module")
def pool(ray_cluster, cfg):
    pool = RolloutPool(cfg, "test-rollout")
    yield pool
    pool.shutdown()


def test_weights_reach_every_actor(pool, cfg, tokenizer):
    learner = load_model(cfg.model, tokenizer)
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(torch.randn_like(p, generator=torch.Generator().manual_seed(1)) * 0.05)
    ids = [tokenizer("The capital of France is")["input_ids"]]
    with torch.inference_mode():
        expected = learner(torch.tensor(ids)).logits
    before = ray.get([actor.logits.remote(ids) for actor in pool.actors])
    assert all(not torch.allclose(b, expected, atol=1e-3) for b in before)
    pool.publish(learner, version=1)
    after = ray.get([actor.logits.remote(ids) for actor in pool.actors])
    assert all(torch.allclose(a, expected, atol=1e-5) for a in after)
    assert ray.get([actor.get_version.remote() for actor in pool.actors]) == [1, 1]


def test_stale_actor_refuses_to_generate(pool, tokenizer):
    ids = [tokenizer("Hello")["input_ids"]]
    with pytest.raises(StaleWeightsError, match="asked for 99"):
        pool.generate(ids, 2, 4, 1.0, seed=0, version=99)


def test_mismatched_weights_are_refused_with_both_sides_named(pool, cfg, tokenizer):
    state = load_model(cfg.model, tokenizer).state_dict()
    state.pop("lm_head.weight", None)
    state["model.norm.weight"] = torch.ones(3)
    with pytest.raises(ray.exceptions.RayTaskError, match="model.norm.weight"):
        ray.get(pool.actors[0].load_weights.remote(state, 5))


def test_generate_returns_n_samples_per_prompt_in_order(pool, tokenizer):
    version = pool.version or 0
    prompts = [tokenizer(t)["input_ids"] for t in ("One", "Two two", "Three three three")]
    completions, logprobs = pool.generate(prompts, 3, 5, 1.0, seed=0, version=version)
    assert len(completions) == len(logprobs) == 9
    assert all(1 <= len(c) <= 5 and len(c) == len(lp) for c, lp in zip(completions, logprobs, strict=True))
    assert all(lp <= 0 for row in logprobs for lp in row)
    again, _ = pool.generate(prompts, 3, 5, 1.0, seed=0, version=version)
    assert again == completions  # seeded


def test_rollout_func_keeps_row_order_and_syncs_weights(pool, cfg, tokenizer):
    learner = load_model(cfg.model, tokenizer)
    trainer = SimpleNamespace(
        state=SimpleNamespace(global_step=7),
        model=learner,
        accelerator=SimpleNamespace(unwrap_model=lambda m: m),
    )
    a = [{"role": "user", "content": "Question A"}]
    b = [{"role": "user", "content": "Question B, longer"}]
    prompts = [a, a, a, a, b, b, b, b]
    out = make_rollout_func(pool, cfg, tokenizer, seed=0, publishes=True)(prompts, trainer)
    assert pool.version == 7
    prompt_a = tokenizer.apply_chat_template(a, tokenize=False, add_generation_prompt=True)
    ids_a = tokenizer(prompt_a, add_special_tokens=False)["input_ids"]
    assert out["prompt_ids"][:4] == [ids_a] * 4 and out["prompt_ids"][4] != ids_a
    assert len(out["completion_ids"]) == len(out["logprobs"]) == 8
