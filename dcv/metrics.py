"""The per-checkpoint numbers of the analysis: one record each, read by the matched comparison
(``dcv.matched``), the analysis tables (``dcv.analysis``), the report (``dcv.report``), the predictors
(``dcv.predictors``) and the config's choices (``dcv.config``). Adding a metric = one record + its
computation (docs/development.md "Recipe: a new metric").

Where a metric's number comes from (``source``):

- ``"results"``: the results table's own column, one per checkpoint (what runs are matched on);
- ``"parts"``: per probe from per-item parts (``dcv.matched.probe_numbers``), so item-resampled in every
  bootstrap draw, then averaged over probes per checkpoint (``counts``: summed, of a per-probe flag);
- ``"fixed"``: one number per checkpoint with no per-item parts (``dcv.matched.Point.fixed``, set in
  ``dcv.analysis.inputs.build_inputs``), never resampled; with ``per="probe"`` the checkpoints table has each
  probe's own value (computed there) and ``fixed`` holds their mean.

Which probes a per-probe metric is averaged over: those in the means of P, J and V when ``circuit`` (it is
measured on base-circuit heads), else every competent prior probe (``ProbeReference.in_forgetting``).

``damage`` says which way is worse: +1 when a larger value means more damage or forgetting (V,
forgetting), -1 when a smaller value does (P, J, faithfulness), 0 when it is not a damage measure (the
matched-on quantities, the predictors' inputs). ``compared``: SFT against RL in the ``headline`` table.
``in_answer``: stated in the report's answer; a metric that fails its own positive control
(docs/method.md "Calibration: controls that can fail") is kept in the tables but left out of the answer,
with ``excluded_because`` saying why. ``chance``: the metric holding the value a random head set of the
same sizes would score.

``PREDICTORS``: the candidate predictors of forgetting (``dcv.predictors``), each read from one metric.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Metric:
    name: str  # the Layout entry and table column
    label: str  # what the report calls it
    damage: int  # +1: larger is worse; -1: smaller is worse; 0: not a damage measure
    source: Literal["results", "parts", "fixed"] = "parts"
    per: Literal["probe", "model"] = "probe"  # a value per (checkpoint, probe), or one per checkpoint
    compared: bool = True  # in the headline table (SFT vs RL at matched levels)
    in_answer: bool = True
    excluded_because: str = ""
    chance: str | None = None  # the metric with the chance level (random heads of the same sizes)
    circuit: bool = False  # measured on base-circuit heads (the probes in means), else on probe scores
    # The lost rule (docs/method.md "Competence guard and the lost rule"): not a number where the
    # checkpoint lost the probe (it divides by the checkpoint's own gap, or ranks its own circuit) ...
    lost_null: bool = False
    # ... or where the probe has no base circuit (not competent, empty circuit).
    needs_circuit: bool = False
    counts: str | None = None  # a count over probes of this per-probe flag (``lost``), not a mean


# Circuit numbers of the base circuit's heads: null without a base circuit and where the probe is lost.
_OWN_GAP = {"circuit": True, "lost_null": True, "needs_circuit": True}

METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("target_accuracy", "target accuracy", 0, "results", "model"),
        Metric("kl_to_base", "KL to base", 0, "results", "model"),
        Metric("forgetting", "forgetting (probe accuracy)", +1),
        Metric("forgetting_ld", "forgetting (mean LD)", +1),
        Metric("forgetting_bench", "forgetting (benchmarks)", +1, "fixed", "model"),
        Metric("preservation", "circuit preservation P", -1, chance="preservation_chance", **_OWN_GAP),
        Metric("jaccard", "circuit Jaccard J", -1, chance="jaccard_chance", **_OWN_GAP),
        Metric(
            "circuit_vulnerability",
            "circuit vulnerability V (relative)",
            +1,
            in_answer=False,
            excluded_because=(
                "fails its positive control: ablating circuit heads makes the remaining heads' shares of the "
                "damaged model's own gap grow, so relative V reads lower when the circuit is cut"
            ),
            **_OWN_GAP,
        ),
        Metric(
            "circuit_vulnerability_abs",
            "circuit vulnerability V (absolute)",
            +1,
            circuit=True,
            needs_circuit=True,
        ),
        # F(C_base, M) per probe from the circuits stage (divides by M's own gap)
        Metric(
            "base_circuit_faithfulness",
            "base-circuit faithfulness",
            -1,
            "fixed",
            circuit=True,
            lost_null=True,
        ),
        Metric("n_lost", "probes lost", +1, counts="lost"),
        # Not compared: predictors' inputs and chance levels.
        Metric("weight_change", "mean head weight change", 0, "fixed", "model", compared=False),
        Metric(
            "cmap", "mean |CMAP| over base-circuit heads", 0, "fixed", "model", compared=False, circuit=True
        ),
        Metric("preservation_chance", "chance level of P", 0, "fixed", compared=False, **_OWN_GAP),
        Metric("jaccard_chance", "chance level of J", 0, "fixed", compared=False, **_OWN_GAP),
    )
}
# The per-checkpoint numbers the headline compares between methods (``dcv.matched.Layout`` names).
HEADLINE_METRICS = tuple(m.name for m in METRICS.values() if m.compared)
# Damage and forgetting measures stated in the answer, in the answer's order.
ANSWER_METRICS = tuple(
    m.name
    for m in sorted(METRICS.values(), key=lambda m: not m.circuit)
    if m.compared and m.damage and m.in_answer
)
# From per-item parts, per probe: the checkpoint vector's means over probes (``dcv.matched.Layout``).
MEAN_METRICS = tuple(m.name for m in METRICS.values() if m.source == "parts")
# ... of those, the ones over every competent prior probe (not only the probes in the means of P, J, V).
FORGETTING_METRICS = tuple(m for m in MEAN_METRICS if not METRICS[m].circuit)
# One number per checkpoint without per-item parts (``dcv.matched.Point.fixed``).
FIXED_METRICS = tuple(m.name for m in METRICS.values() if m.source == "fixed")


def label(name: str) -> str:
    """The report's name of a metric (its table name where it has no record)."""
    return METRICS[name].label if name in METRICS else name


def with_chance(names: tuple[str, ...] | list[str]) -> list[str]:
    """Table columns of ``names``, each followed by its chance level and its distance above it."""
    out = []
    for name in names:
        chance = METRICS[name].chance if name in METRICS else None
        out += [name, chance, f"{name}_above_chance"] if chance else [name]
    return out


@dataclass(frozen=True)
class Predictor:
    """A candidate predictor of forgetting (``dcv.predictors``)."""

    label: str
    entry: str  # the metric (Layout entry) it is read from ("step": the checkpoint's training step)
    complement: bool  # the predictor is 1 - entry (damage grows with it)
    needs: str  # what measures it (said where it was not measured)
    short: str  # figure label

    @property
    def items(self) -> bool:
        """Read from the probe items (a circuit metric): meets item-based forgetting on disjoint items."""
        return self.entry in METRICS and METRICS[self.entry].circuit


# In the predictors table's and the report's order; ``analysis.predictors`` names them.
PREDICTORS = {
    "kl_to_base": Predictor(
        "KL to base (target task)", "kl_to_base", False, "the results table's kl_to_base", "KL to base"
    ),
    "weight_change": Predictor(
        "mean relative weight change of the heads",
        "weight_change",
        False,
        "weight_change.enabled: true",
        "weight change",
    ),
    "circuit_vulnerability": Predictor(
        "V (relative)", "circuit_vulnerability", False, "a probe in the means", "V (relative)"
    ),
    "circuit_vulnerability_abs": Predictor(
        "V (absolute)", "circuit_vulnerability_abs", False, "a probe in the means", "V (absolute)"
    ),
    "one_minus_preservation": Predictor("1 - P", "preservation", True, "a probe in the means", "1 - P"),
    "one_minus_jaccard": Predictor("1 - J", "jaccard", True, "a probe in the means", "1 - J"),
    "cmap": Predictor(
        "mean |CMAP| over base-circuit heads (checkpoint into base)",
        "cmap",
        False,
        "patching.methods with cmap",
        "CMAP",
    ),
    "steps": Predictor("training steps (baseline)", "step", False, "a fine-tuned checkpoint", "steps"),
}
_unknown = [p.entry for p in PREDICTORS.values() if p.entry not in METRICS and p.entry != "step"]
if _unknown:
    raise ValueError(
        f"dcv.metrics.PREDICTORS: entries {_unknown} name no metric; valid: {list(METRICS)} or step"
    )
