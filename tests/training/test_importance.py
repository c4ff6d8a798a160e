"""Truncated importance sampling on rollout_func's log-probs: the formula on synthetic log-probs, its
equality with TRL 1.16's own correction inside TRL's ``_compute_loss``, the config wiring, and the hook on
a real trainer's rollout_func path (tiny model, no Ray)."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from dcv.config import RLConfig
from dcv.training.grpo import grpo_args
from dcv.training.importance import (
    SamplerCorrectedGRPOTrainer,
    correct_for_sampler,
    truncated_importance_weights,
    weight_advantages,
)


def test_weights_are_truncated_ratios_detached_and_neutral_off_mask():
    learner = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-1.0, -1.0, -1.0, -1.0]], requires_grad=True)
    sampler = torch.tensor([[-1.5, -1.0, -4.0, -3.0], [float("nan"), -1.0, -1.0, -9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    w = truncated_importance_weights(learner, sampler, mask, cap=3.0)
    expected = torch.tensor(
        [[math.exp(0.5), math.exp(-1.0), 3.0, 1.0], [1.0, 1.0, 1.0, 1.0]]  # e^3.5 cut to 3; NaN, mask -> 1
    )
    torch.testing.assert_close(w, expected)
    assert not w.requires_grad and w.grad_fn is None
    same = truncated_importance_weights(learner, learner.detach(), mask, cap=3.0)
    assert torch.equal(same, torch.ones_like(same))


def test_weighted_advantages_are_per_token():
    a = torch.tensor([1.0, -2.0])
    w = torch.tensor([[1.0, 0.5], [2.0, 1.0]])
    assert torch.equal(weight_advantages(a, w), torch.tensor([[1.0, 0.5], [-4.0, -2.0]]))
    output = {
        "completion_mask": torch.tensor([[1, 1], [1, 0]]),
        "old_per_token_logps": torch.tensor([[-1.0, -1.0], [-1.0, -1.0]]),
        "sampling_per_token_logps": torch.tensor([[-1.0, -2.0], [-1.0, -5.0]]),
        "advantages": a.clone(),
    }
    weights = correct_for_sampler(output, cap=2.0)
    torch.testing.assert_close(weights, torch.tensor([[1.0, 2.0], [1.0, 1.0]]))  # e^1 cut to 2; masked: 1
    torch.testing.assert_close(output["advantages"], torch.tensor([[1.0, 2.0], [-2.0, -2.0]]))


def fake_trainer(loss_type: str, logps: torch.Tensor, use_vllm: bool) -> SimpleNamespace:
    """Just what TRL 1.16's GRPOTrainer._compute_loss reads, one process, no model: the policy's per-token
    log-probs are ``logps`` (a leaf that requires grad)."""
    accelerator = SimpleNamespace(
        gather=lambda x: x.reshape(-1) if x.dim() == 0 else x,
        gather_for_metrics=lambda x: x,
        reduce=lambda x, reduction: x,
        num_processes=1,
    )
    return SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps * 1.0, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=0.0,
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=0.2,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=logps.shape[1],
        accelerator=accelerator,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        use_vllm=use_vllm,
        vllm_importance_sampling_correction=use_vllm,
    )


def trl_loss(loss_type, policy, inputs, use_vllm):
    """TRL's own _compute_loss, its loss and the gradient with respect to the policy's log-probs."""
    logps = policy.clone().requires_grad_(True)
    loss = GRPOTrainer._compute_loss(fake_trainer(loss_type, logps, use_vllm), None, inputs)
    (grad,) = torch.autograd.grad(loss, logps)
    return loss.detach(), grad


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_weighting_advantages_equals_trls_own_correction(loss_type):
    """dcv's hook (weights in the advantages, TRL's vLLM branch off) gives TRL's loss and gradient with its
    correction on (per_token_loss * importance_sampling_ratio); with sampler == learner both equal no
    correction at all."""
    g = torch.Generator().manual_seed(0)
    batch, length = 4, 5
    old = -torch.rand(batch, length, generator=g) * 3  # learner before the update
    policy = old + 0.3 * torch.randn(batch, length, generator=g)  # after a step: some ratios get clipped
    sampler = old + 0.8 * torch.randn(batch, length, generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 3:] = 0
    base = {
        "prompt_ids": torch.zeros(batch, 2, dtype=torch.long),
        "prompt_mask": torch.ones(batch, 2, dtype=torch.long),
        "completion_ids": torch.zeros(batch, length, dtype=torch.long),
        "completion_mask": mask,
        "old_per_token_logps": old,
        "num_items_in_batch": mask.sum(),
    }
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.5])
    weights = truncated_importance_weights(old, sampler, mask, cap=2.0)
    assert (weights == 2.0).any() and (weights < 1.0).any()  # both the cut and a down-weighting happen

    trls = {**base, "advantages": advantages, "importance_sampling_ratio": weights}
    trl = trl_loss(loss_type, policy, trls, use_vllm=True)
    dcvs = {**base, "advantages": weight_advantages(advantages, weights)}
    dcv = trl_loss(loss_type, policy, dcvs, use_vllm=False)
    plain = trl_loss(loss_type, policy, {**base, "advantages": advantages}, use_vllm=False)
    torch.testing.assert_close(dcv, trl)
    assert not torch.allclose(plain[1], trl[1])  # the correction changes the gradient

    ones = truncated_importance_weights(old, old, mask, cap=2.0)
    neutral = {**base, "advantages": weight_advantages(advantages, ones)}
    same = trl_loss(loss_type, policy, neutral, use_vllm=False)
    torch.testing.assert_close(same, plain)


@pytest.mark.parametrize(
    ("backend", "correction", "expected"),
    [("hf", None, False), ("vllm", None, True), ("hf", True, True), ("vllm", False, False)],
)
def test_grpo_args_carry_the_correction_under_trls_names(tmp_path, backend, correction, expected):
    r = RLConfig(
        importance_sampling_correction=correction,
        importance_sampling_cap=2.5,
        rollout={"backend": backend},
        num_generations=4,
        per_device_batch_size=4,
    )
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **grpo_args(r))
    assert args.vllm_importance_sampling_correction is expected
    assert args.vllm_importance_sampling_mode == "token_truncate"
    assert args.vllm_importance_sampling_clip_max == 2.5
    assert args.use_vllm is False  # TRL's own correction stays off: dcv's trainer applies it


SAMPLER_LOGPS = (-100.0, 0.0)  # per completion, alternating: ratio e^(old+100) is cut to the cap; e^old < 1


def test_trainer_corrects_rollout_func_completions(tiny_model, tokenizer, tmp_path):
    """On a real trainer's rollout_func path (TRL 1.16's _generate_and_score_completions underneath), the
    advantages come out per token as TRL's per-completion advantages times min(exp(old - sampler), cap)."""
    n, completion = 4, [11, 12, 13]

    def rollout_func(prompts, trainer):
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        lps = [[SAMPLER_LOGPS[i % 2]] * len(completion) for i in range(len(prompts))]
        return {"prompt_ids": ids, "completion_ids": [completion] * len(prompts), "logprobs": lps}

    def index_reward(completions, **kwargs):
        return [float(i) for i in range(len(completions))]  # distinct rewards: non-zero advantages

    def build(correction: bool) -> SamplerCorrectedGRPOTrainer:
        r = RLConfig(
            importance_sampling_correction=correction,
            importance_sampling_cap=2.0,
            num_generations=n,
            per_device_batch_size=n,
            max_completion_length=len(completion),
        )
        args = GRPOConfig(
            output_dir=str(tmp_path / str(correction)),
            per_device_train_batch_size=n,
            use_cpu=True,
            report_to="none",
            gradient_checkpointing=False,
            **grpo_args(r),
        )
        model = type(tiny_model)(tiny_model.config)
        model.load_state_dict(tiny_model.state_dict())
        return SamplerCorrectedGRPOTrainer(
            model=model.train(),
            reward_funcs=[index_reward],
            args=args,
            train_dataset=Dataset.from_list([{"prompt": "Hello"}]),
            processing_class=tokenizer,
            rollout_func=rollout_func,
        )

    rows = [{"prompt": "Hello there"}] * n
    plain = build(False)._generate_and_score_completions(rows)
    corrected_trainer = build(True)
    corrected = corrected_trainer._generate_and_score_completions(rows)
    assert plain["advantages"].shape == (n,) and corrected["advantages"].shape == (n, len(completion))
    old = corrected["old_per_token_logps"]
    sampler = torch.tensor([[SAMPLER_LOGPS[i % 2]] * len(completion) for i in range(n)])
    torch.testing.assert_close(corrected["sampling_per_token_logps"], sampler)
    weights = torch.clamp(torch.exp(old - sampler), max=2.0)
    assert torch.equal(weights[0::2], torch.full_like(weights[0::2], 2.0)) and (weights[1::2] < 1).all()
    torch.testing.assert_close(corrected["advantages"], plain["advantages"].unsqueeze(1) * weights)
    assert corrected_trainer._metrics["train"]["sampling/importance_sampling_ratio/max"] == [2.0]
