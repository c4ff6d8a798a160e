"""Rollout actors and weight sync, on a real local Ray with the tiny model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray
import torch

from dcv.config import parse_config
from dcv.models import load_model
from dcv.training.grpo import make_rollout_func
from dcv.training.rollout import (
    HFRolloutBackend,
    RolloutPool,
    StaleWeightsError,
    prompt_seeds,
    receive_weights,
    sampling_seed,
)
from tests.helpers import tiny_config_dict


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


def test_sampling_seeds_are_distinct_per_step_rank_call_and_prompt():
    """Every (step, rank, call, prompt) of a sweep-sized trial gets its own seed, and vLLM's per-child
    ranges [seed, seed + n) of two prompts never overlap (the old seed + actor sums collided)."""
    n = 16
    seeds = [
        sampling_seed(sampling_seed(trial_seed, step, rank, call), prompt)
        for trial_seed in range(3)
        for step in range(20)
        for rank in range(4)
        for call in range(2)
        for prompt in range(16)
    ]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**63 for s in seeds)
    ordered = sorted(seeds)
    assert all(b - a >= n for a, b in zip(ordered, ordered[1:], strict=False))
    assert sampling_seed(0, 1) == sampling_seed(0, 1) and sampling_seed(0, 1) != sampling_seed(1, 0)


def test_hf_backend_samples_each_prompt_from_its_own_seed(cfg, tokenizer):
    """The same prompt twice in one call, with the pool's per-prompt seeds: different samples; with one
    seed given twice: the same samples (the stream is the prompt's seed, not the call's position)."""
    backend = HFRolloutBackend(cfg)
    ids = tokenizer("The same question")["input_ids"]
    seeds = prompt_seeds(sampling_seed(0, 1, 0, 0), 2)
    completions, _ = backend.generate([ids, ids], 4, 6, 1.0, seeds=seeds)
    assert completions[:4] != completions[4:]
    same, _ = backend.generate([ids, ids], 4, 6, 1.0, seeds=[seeds[0], seeds[0]])
    assert same[:4] == same[4:] == completions[:4]


def test_no_two_prompts_of_a_step_share_a_random_stream(pool, cfg, tokenizer):
    """One GRPO step on two ranks, the same question in several groups of each rank's rows (two group
    sizes, so two generate calls): at temperature 1 every group's samples differ from every other's,
    because each prompt of the step has its own seed. Rerun, the step gives the same samples (seeded)."""
    learner = load_model(cfg.model, tokenizer)
    trainer = SimpleNamespace(
        state=SimpleNamespace(global_step=13),
        model=learner,
        accelerator=SimpleNamespace(unwrap_model=lambda m: m),
    )
    a = [{"role": "user", "content": "Question A"}]
    b = [{"role": "user", "content": "Question B"}]
    rows = [a] * 4 + [b] * 4 + [a] * 4 + [a] * 2  # groups a, b, a (size 4: one call), a (size 2: another)
    outputs = [
        make_rollout_func(pool, cfg, tokenizer, seed=0, publishes=rank == 0, rank=rank)(rows, trainer)
        for rank in (0, 1)
    ]
    assert cfg.rl.temperature == 1.0
    groups = []
    for out in outputs:
        completions = out["completion_ids"]
        for start, size in ((0, 4), (4, 4), (8, 4), (12, 2)):
            groups.append(tuple(tuple(c) for c in completions[start : start + size]))
    firsts = [group[0] for group in groups]
    assert len(set(groups)) == len(groups) == 8
    assert len(set(firsts)) == len(firsts)  # not even one stream is shared: first samples differ too
    again = make_rollout_func(pool, cfg, tokenizer, seed=0, publishes=False, rank=1)(rows, trainer)
    assert again["completion_ids"] == outputs[1]["completion_ids"]


NEAR_GREEDY = 1e-6  # logits / 1e-6: sampling picks the argmax unless two logits tie to within ~1e-6


def greedy_completion(model, tokenizer, ids: list[int], max_new_tokens: int) -> list[int]:
    """A direct HF greedy ``generate`` of one prompt, cut after the first EOS as the rollout backend cuts."""
    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    tokens = out[0, len(ids) :].tolist()
    return tokens[: tokens.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in tokens else tokens


def prompt_dependent_learner(cfg, tokenizer):
    """The tiny model plus seeded noise (std 0.2): the plain tiny model continues every chat prompt with
    the same newlines, this one's greedy continuations differ from prompt to prompt."""
    learner = load_model(cfg.model, tokenizer)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.2)
    return learner


def test_each_prompts_completions_continue_that_prompt(pool, cfg, tokenizer):
    """Prompts are spread over the actors and gathered back: each prompt's n completions must be its own,
    here (near-greedy sampling, known weights) exactly the direct greedy generation of that prompt."""
    learner = prompt_dependent_learner(cfg, tokenizer)
    pool.publish(learner, version=11)
    texts = ("One", "Two two", "Three three three", "Four and four")
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    expected = [greedy_completion(learner, tokenizer, ids, 5) for ids in prompts]
    assert len({tuple(e) for e in expected}) == len(prompts)  # distinct: a swap would be seen
    completions, logprobs = pool.generate(prompts, 2, 5, NEAR_GREEDY, seed=0, version=11)
    assert completions == [e for e in expected for _ in range(2)]
    assert all(lp == pytest.approx(0.0, abs=1e-3) for row in logprobs for lp in row)  # the argmax each time


def test_rollout_func_rows_carry_their_own_prompt_and_completions(pool, cfg, tokenizer):
    """Groups of different sizes are generated in separate calls (one per size) and put back in row
    order: every row's prompt_ids are its prompt's tokens and its completion continues that prompt."""
    learner = prompt_dependent_learner(cfg, tokenizer)
    trainer = SimpleNamespace(
        state=SimpleNamespace(global_step=13),
        model=learner,
        accelerator=SimpleNamespace(unwrap_model=lambda m: m),
    )
    near_greedy = cfg.model_copy(update={"rl": cfg.rl.model_copy(update={"temperature": NEAR_GREEDY})})
    a, b, c = ([{"role": "user", "content": text}] for text in ("Question A", "Question B, longer", "C?"))
    prompts = [a, a, b, b, b, b, c, c]  # groups of 2, 4, 2: a and c share one call, b has its own
    out = make_rollout_func(pool, near_greedy, tokenizer, seed=0, publishes=True)(prompts, trainer)
    assert pool.version == 13
    for row, prompt in enumerate(prompts):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert out["prompt_ids"][row] == ids, row
        expected = greedy_completion(learner, tokenizer, ids, cfg.rl.max_completion_length)
        assert out["completion_ids"][row] == expected, row
    assert len({tuple(out["completion_ids"][row]) for row in (0, 2, 6)}) == 3  # the three prompts differ


class StaleBackend(HFRolloutBackend):
    """Accepts the weights and keeps its old ones (what users report of vLLM after sleep mode)."""

    def load_weights(self, state_dict):
        pass


class LayerSwappingBackend(HFRolloutBackend):
    """Loads every tensor, the first and last decoder layers' under each other's names (a name-map bug)."""

    def load_weights(self, state_dict):
        last = self.model.config.num_hidden_layers - 1
        swap = {"model.layers.0.": f"model.layers.{last}.", f"model.layers.{last}.": "model.layers.0."}
        renamed = {}
        for name, tensor in state_dict.items():
            prefix = next((p for p in swap if name.startswith(p)), None)
            renamed[name if prefix is None else swap[prefix] + name[len(prefix) :]] = tensor
        super().load_weights(renamed)


def test_received_weights_are_read_back_from_the_engine(cfg, tokenizer):
    """The checksum check runs the same code for every backend; on the hf backend (no Ray here) a load that
    took passes, and a backend that kept stale weights or loaded them under other names is refused."""
    learner = prompt_dependent_learner(cfg, tokenizer)
    state = {k: v.detach().clone() for k, v in learner.state_dict().items()}
    backend = HFRolloutBackend(cfg)
    receive_weights(backend, state, version=3)
    assert torch.equal(backend.model.state_dict()["model.norm.weight"], state["model.norm.weight"])
    with pytest.raises(ValueError, match=r"v4: after load_weights, replica 0 .*model\.layers\.0\."):
        receive_weights(StaleBackend(cfg), state, version=4)
    with pytest.raises(ValueError, match=r"replica 0 .* 8 of the 9 checked tensors"):
        receive_weights(LayerSwappingBackend(cfg), state, version=5)


def test_hf_rollouts_end_at_the_generation_configs_second_eos(cfg, tokenizer, tmp_path):
    """A model folder whose generation_config.json lists two EOS ids (Qwen2.5-Instruct's shape): the hf
    backend cuts each completion at the first of either, where it used to know only the tokenizer's."""
    from dcv.models import save_model

    model = prompt_dependent_learner(cfg, tokenizer)
    prompt = tokenizer("One")["input_ids"]
    first = greedy_completion(model, tokenizer, prompt, 5)[0]
    assert first != tokenizer.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, first]
    folder = save_model(model, tokenizer, tmp_path / "two-eos")
    two_eos = parse_config({**cfg.model_dump(mode="json"), "model": {"name": str(folder)}})
    backend = HFRolloutBackend(two_eos)
    assert set(backend.stop_ids) == {tokenizer.eos_token_id, first}
    completions, logprobs = backend.generate([prompt], 2, 5, NEAR_GREEDY, seeds=[0])
    assert completions == [[first], [first]] and [len(lp) for lp in logprobs] == [1, 1]
