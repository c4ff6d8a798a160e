"""The competence guard: which probes the base model does, and which checkpoints lost a behaviour.

Every effect, faithfulness and vulnerability divides by a logit-difference gap g = mean_i(LD_clean_i -
LD_corrupt_i). A gap near 0 (a probe the base model cannot do, a checkpoint that forgot it, a bootstrap
resample) turns those ratios into large numbers of arbitrary sign, so (docs/method.md "Competence guard and
the lost rule"):

- a probe is used for circuits only where the base model does it: the 95% item-bootstrap CI of its gap
  lies above 0 and its accuracy (LD > 0) is at least ``min_accuracy``;
- a checkpoint whose gap fell below ``lost_fraction`` of the base gap has *lost* the behaviour: it counts
  as forgetting and its relative effects are not numbers.

Pure numpy: the per-item gaps are the patching table's ``item_denominator``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Competence:
    gap: float  # mean_i(LD_clean - LD_corrupt) of the base model
    gap_ci_low: float
    gap_ci_high: float
    accuracy: float  # share of items with LD_clean > 0
    n_items: int
    competent: bool
    reason: str  # "" when competent, else why not (for the report)


def base_competence(
    denominator: np.ndarray,
    accuracy: float,
    min_accuracy: float,
    n_bootstrap: int = 1000,
    ci_level: float = 0.95,
    seed: int = 0,
) -> Competence:
    """Whether the base model does a probe, from its per-item gaps and its accuracy."""
    gaps = np.asarray(denominator, dtype=np.float64)
    rng = np.random.default_rng(seed)
    boot = gaps[rng.integers(0, len(gaps), (n_bootstrap, len(gaps)))].mean(axis=1)
    alpha = (1 - ci_level) / 2
    low, high = float(np.quantile(boot, alpha)), float(np.quantile(boot, 1 - alpha))
    reasons = []
    if low <= 0:
        reasons.append(f"gap CI [{low:.3g}, {high:.3g}] does not lie above 0")
    if accuracy < min_accuracy:
        reasons.append(f"accuracy {accuracy:.3g} < min_accuracy {min_accuracy:g}")
    return Competence(
        float(gaps.mean()), low, high, float(accuracy), len(gaps), not reasons, "; ".join(reasons)
    )


def is_lost(model_gap: float, base_gap: float, lost_fraction: float) -> bool:
    """The checkpoint's gap fell below ``lost_fraction`` of the (positive) base gap."""
    return bool(model_gap < lost_fraction * base_gap)
