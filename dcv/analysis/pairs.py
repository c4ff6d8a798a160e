"""The ``pairs`` table: with ``comparison.each_pair`` (external runs of 3+ method labels), the headline's
matched comparison for every pair of labels, each pair's verdicts corrected for the number of pairs.

Each pair is analysed exactly as the headline would be with ``comparison.methods`` set to it (the same
slots, inputs, bootstrap draws and ``assign_roles``): the chosen pair's rows hold the headline's numbers,
and every pair's ``sft`` slot is its ``first``, its ``rl`` slot its ``second``.

Multiplicity. Within one pair the primary endpoint is tested at alpha and the secondary family is
Holm-adjusted (``assign_roles``); the across-seeds test's false-positive rate at alpha is checked by
simulation (``bench/null_calibration.py``). With k pairs, k verdicts at alpha would let the chance of some
false verdict grow towards k alpha, so every adjusted p of the table is multiplied by k (Bonferroni,
``dcv.matched.bonferroni``): by the union bound the chance of any false verdict among the k pairs' primary
endpoints (and among their secondary families) stays at most alpha, whatever the dependence between pairs
(they share runs: sft-dpo and sft-rlvr hold the same sft runs). The headline itself stays uncorrected: it
is the one pair chosen before the data (comparison.methods).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import polars as pl

from dcv.analysis.headline import HEADLINE_SCHEMA, assign_roles
from dcv.analysis.inputs import Analysis
from dcv.config import ExperimentConfig

PAIRS_SCHEMA = {
    "first": pl.String,  # the pair's first label: the sft slot (training "sft"; sft-rl = first - second)
    "second": pl.String,  # its second label: the rl slot
    # The headline's columns of that pair; p_adjusted, verdict_runs and verdict_seeds are corrected for the
    # number of pairs (Bonferroni: p_adjusted = min(1, pairs x the headline's)).
    **HEADLINE_SCHEMA,
}


def label_pairs(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """The pairs compared: every pair of external labels in label order (``ExternalConfig.labels``), the
    chosen pair as comparison.methods orders it; none without comparison.each_pair."""
    if not cfg.comparison.each_pair or cfg.external is None:
        return []
    chosen = cfg.comparison.methods
    return [
        chosen if set(pair) == set(chosen) else pair
        for pair in itertools.combinations(cfg.external.labels(), 2)
    ]


def pairs_rows(
    cfg: ExperimentConfig, headline: list[dict], headline_of: Callable[[ExperimentConfig], list[dict]]
) -> list[dict]:
    """Every pair's headline rows (``label_pairs``) with ``first`` and ``second``, their verdicts at
    alpha / number of pairs. ``headline``: the chosen pair's rows (copied, never changed);
    ``headline_of``: the headline rows of a config comparing another pair."""
    compared = label_pairs(cfg)
    alpha = 1 - cfg.circuits.ci_level
    out = []
    for first, second in compared:
        if (first, second) == cfg.comparison.methods:
            rows = [dict(row) for row in headline]
        else:
            update = {"comparison": cfg.comparison.model_copy(update={"methods": (first, second)})}
            rows = headline_of(cfg.model_copy(update=update))
        # The Holm family is one patching method's rows (as in ``matched_tables``): correct each anew.
        for method in dict.fromkeys(row["patching"] for row in rows):
            assign_roles(cfg, [row for row in rows if row["patching"] == method], alpha, len(compared))
        out += [{"first": first, "second": second, **row} for row in rows]
    return out


def build(a: Analysis) -> dict[str, pl.DataFrame]:
    return {"pairs": pl.DataFrame(a.pairs, schema=PAIRS_SCHEMA)}
