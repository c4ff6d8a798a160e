"""Truncated importance sampling (TIS) for completions sampled by dcv's rollout actors.

The rollout engine samples from a slightly different distribution than the learner computes (vLLM's kernels,
bfloat16), so GRPO's "on-policy" tokens are off-policy by a little. TIS (Yao et al. 2025, "Your efficient RL
framework secretly brings you off-policy RL training") weights each completion token's loss by

    w_t = min(exp(logp_learner(t) - logp_sampler(t)), C)         # detached: a weight, not a gradient path

where ``logp_learner`` is the learner's log-prob before the update (TRL's ``old_per_token_logps``) and
``logp_sampler`` the engine's. This is TRL 1.16's ``vllm_importance_sampling_mode="token_truncate"``
formula (``grpo_trainer.py`` `_generate_and_score_completions`), with the same NaN rule (a token the sampler
could not score gets weight 1). TRL computes it only when it generates with vLLM itself (``use_vllm``): every
branch is gated on ``self.use_vllm and self.vllm_importance_sampling_correction``, and ``use_vllm`` also
builds TRL's own vLLM engine, so dcv, which generates through ``rollout_func``, cannot turn it on.

`SamplerCorrectedGRPOTrainer` therefore overrides one method, ``_generate_and_score_completions``: after
TRL's, it computes the weights and multiplies them into the advantages, which TRL's ``_compute_loss``
accepts per token ([B, T], its documented extension point). Every per-token loss TRL 1.16 has for dcv's
loss types is positively homogeneous in the advantage (``-min(r*A*w, clip(r)*A*w) = w * -min(r*A,
clip(r)*A)`` for ``w > 0``), and the KL term is added after TRL's own multiplication, so this equals TRL's
``per_token_loss * importance_sampling_ratio``; ``tests/training/test_importance.py`` checks that against
TRL's ``_compute_loss`` itself.
"""

from __future__ import annotations

from typing import Any

import torch
from trl import GRPOTrainer

TRUNCATE_MODE = "token_truncate"


def truncated_importance_weights(
    learner_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """``min(exp(learner - sampler), cap)`` per token, 1 where masked or NaN, detached.  # [B, T] -> [B, T]"""
    diff = torch.nan_to_num((learner_logps - sampler_logps) * mask, nan=0.0)
    return torch.clamp(torch.exp(diff), max=cap).detach()


def weight_advantages(advantages: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-token advantages ``A_i * w_it``.  # [B] or [B, T], [B, T] -> [B, T]"""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    return advantages * weights


def correct_for_sampler(output: dict[str, Any], cap: float) -> torch.Tensor:
    """Apply TIS to one generation batch of TRL's (``_generate_and_score_completions``'s output, which must
    hold ``old_per_token_logps`` and ``sampling_per_token_logps``): its advantages become per token. Returns
    the weights.  # [B, T]"""
    mask = output["completion_mask"]
    if "tool_mask" in output:
        mask = mask * output["tool_mask"]
    weights = truncated_importance_weights(
        output["old_per_token_logps"], output["sampling_per_token_logps"], mask, cap
    )
    output["advantages"] = weight_advantages(output["advantages"], weights)
    return weights


class SamplerCorrectedGRPOTrainer(GRPOTrainer):
    """GRPOTrainer that applies TIS with the log-probs ``rollout_func`` returned (see the module docstring),
    configured by TRL's own fields: ``vllm_importance_sampling_correction``, ``vllm_importance_sampling_mode``
    (only ``token_truncate``) and ``vllm_importance_sampling_clip_max`` (the cap)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self._corrects_rollouts and self.args.vllm_importance_sampling_mode != TRUNCATE_MODE:
            raise ValueError(
                f"vllm_importance_sampling_mode={self.args.vllm_importance_sampling_mode!r}: dcv's "
                f"rollout_func correction implements only {TRUNCATE_MODE!r} (rl.importance_sampling_*)"
            )

    @property
    def _corrects_rollouts(self) -> bool:
        # With use_vllm TRL corrects by itself; applying it here too would weight twice.
        return (
            self.rollout_func is not None
            and not self.use_vllm
            and bool(self.args.vllm_importance_sampling_correction)
        )

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if not self._corrects_rollouts or output.get("sampling_per_token_logps") is None:
            return output
        if output.get("old_per_token_logps") is None:
            # TRL skips this forward pass when steps are aligned; TIS needs the learner's log-probs before
            # the update, as TRL's vLLM path computes them (and then uses them in the loss too).
            output["old_per_token_logps"] = self._learner_logps(output)
        weights = correct_for_sampler(output, self.args.vllm_importance_sampling_clip_max)
        self._log_weights(weights, output["completion_mask"].bool())
        return output

    def _learner_logps(self, output: dict[str, Any]) -> torch.Tensor:
        mode = "train" if self.model.training else "eval"
        batch_size = (
            self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        )
        with torch.no_grad():
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.model,
                torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1),
                torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1),
                output["completion_ids"].size(1),
                batch_size=batch_size,
            )
        return logps

    def _log_weights(self, weights: torch.Tensor, mask: torch.Tensor) -> None:
        """TRL's metric names for the same quantity (``sampling/importance_sampling_ratio/*``)."""
        mode = "train" if self.model.training else "eval"
        flat = weights[mask]
        local = (
            torch.stack([flat.min(), flat.mean(), flat.max()])
            if flat.numel()
            else torch.full((3,), float("nan"), device=weights.device)
        )
        stats = self.accelerator.gather(local.unsqueeze(0))  # every rank gathers, even with no tokens
        stats = stats[~stats[:, 0].isnan()]
        if len(stats):
            self._metrics[mode]["sampling/importance_sampling_ratio/min"].append(stats[:, 0].min().item())
            self._metrics[mode]["sampling/importance_sampling_ratio/mean"].append(stats[:, 1].mean().item())
            self._metrics[mode]["sampling/importance_sampling_ratio/max"].append(stats[:, 2].max().item())
