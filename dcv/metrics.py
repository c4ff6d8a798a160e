"""The metrics the analysis compares between training methods: one record each, read by the matched
comparison, the analysis tables, the report and the predictors (adding one = one record + its computation).

A metric's ``damage`` says which way is worse: +1 when a larger value means more damage or forgetting
(V, forgetting), -1 when a smaller value does (P, J, faithfulness), 0 when it is not a damage measure (the
matched-on quantities). ``in_answer``: stated in the report's answer; a metric that fails its own positive
control (docs/method.md "Calibration: controls that can fail") is kept in the tables but left out of the
answer, with ``excluded_because`` saying why. ``chance``: the column holding the value a random head set of
the same sizes would score.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str  # the Layout entry and table column
    label: str  # what the report calls it
    damage: int  # +1: larger is worse; -1: smaller is worse; 0: not a damage measure
    in_answer: bool = True
    excluded_because: str = ""
    chance: str | None = None  # column with the chance level (random heads of the same sizes)
    circuit: bool = False  # measured on base-circuit heads (the probes in means), else on probe scores


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("target_accuracy", "target accuracy", 0),
        Metric("kl_to_base", "KL to base", 0),
        Metric("forgetting", "forgetting (probe accuracy)", +1),
        Metric("forgetting_ld", "forgetting (mean LD)", +1),
        Metric("forgetting_bench", "forgetting (benchmarks)", +1),
        Metric("preservation", "circuit preservation P", -1, chance="preservation_chance", circuit=True),
        Metric("jaccard", "circuit Jaccard J", -1, chance="jaccard_chance", circuit=True),
        Metric(
            "circuit_vulnerability",
            "circuit vulnerability V (relative)",
            +1,
            in_answer=False,
            excluded_because=(
                "fails its positive control: ablating circuit heads makes the remaining heads' shares of the "
                "damaged model's own gap grow, so relative V reads lower when the circuit is cut"
            ),
            circuit=True,
        ),
        Metric("circuit_vulnerability_abs", "circuit vulnerability V (absolute)", +1, circuit=True),
        Metric("base_circuit_faithfulness", "base-circuit faithfulness", -1, circuit=True),
        Metric("n_lost", "probes lost", +1),
    )
}
# The per-checkpoint numbers the headline compares between methods (``dcv.matched.Layout`` names).
HEADLINE_METRICS = tuple(METRICS)
# Damage and forgetting measures stated in the answer, in the answer's order.
ANSWER_METRICS = tuple(
    m.name for m in sorted(METRICS.values(), key=lambda m: not m.circuit) if m.damage and m.in_answer
)


def label(name: str) -> str:
    """The report's name of a metric (its table name where it has no record)."""
    return METRICS[name].label if name in METRICS else name
