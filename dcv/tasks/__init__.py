"""Target task (chemistry QA, SciKnowEval) and prior-capability probes."""

from __future__ import annotations

from dcv.config import TargetTaskConfig
from dcv.tasks.items import ProbeItem, ProbeSet, QAItem

__all__ = ["ProbeItem", "ProbeSet", "QAItem", "load_target_splits"]


def load_target_splits(cfg: TargetTaskConfig) -> tuple[list[QAItem], list[QAItem]]:
    """(train, test) items of the configured target task; deterministic by ``cfg.seed``."""
    if cfg.name == "chemistry":
        from dcv.tasks.chemistry import build_chemistry_splits

        return build_chemistry_splits(cfg)
    from dcv.tasks.sciknoweval import build_sciknoweval_splits

    return build_sciknoweval_splits(cfg)
