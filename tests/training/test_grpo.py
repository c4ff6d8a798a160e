"""The GRPOConfig dcv builds from ``rl`` (no Ray: the GRPO-specific arguments are a pure function)."""

from __future__ import annotations

import pytest
from trl import GRPOConfig

from dcv.config import RLConfig
from dcv.training.grpo import grpo_args


def build_grpo_config(r: RLConfig, tmp_path) -> GRPOConfig:
    """As train_loop_per_worker builds it, with the Ray-dependent shared arguments reduced to a CPU run."""
    return GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=r.per_device_batch_size,
        use_cpu=True,
        report_to="none",
        **grpo_args(r),
    )


@pytest.mark.parametrize(
    ("loss_type", "scale_rewards", "expected"),
    [
        ("dr_grpo", None, "none"),  # Dr. GRPO as the seed paper runs it: no std division
        ("dapo", None, "group"),  # TRL's default otherwise
        ("grpo", None, "group"),
        ("dr_grpo", "group", "group"),  # an explicit choice wins
        ("dapo", "batch", "batch"),
        ("dapo", "none", "none"),
    ],
)
def test_grpo_config_scale_rewards_follows_the_loss_type(tmp_path, loss_type, scale_rewards, expected):
    r = RLConfig(loss_type=loss_type, scale_rewards=scale_rewards, num_generations=4, per_device_batch_size=8)
    args = build_grpo_config(r, tmp_path)
    assert args.loss_type == loss_type
    assert args.scale_rewards == expected
    assert (args.num_generations, args.beta, args.max_completion_length) == (
        4,
        r.beta,
        r.max_completion_length,
    )


def test_scale_rewards_rejects_unknown_values():
    with pytest.raises(ValueError, match="scale_rewards"):
        RLConfig(scale_rewards="std")
