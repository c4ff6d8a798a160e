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

Its report section (``section``) says which pairs were compared and the correction, then every pair's
primary endpoint and secondary family.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import polars as pl

from dcv.analysis.headline import HEADLINE_SCHEMA, HIGHER, LOWER, assign_roles
from dcv.analysis.inputs import Analysis
from dcv.analysis.section import AXIS_NAMES, Block, Page, shown, sig3
from dcv.config import ExperimentConfig
from dcv.metrics import label as metric_label

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


def pair_name(first: str, second: str) -> str:
    """A pair as the report's prose writes it: "DPO vs SFT"."""
    return " vs ".join(shown((first, second)))


def section(page: Page) -> list[Block]:
    """The pairs table's section (comparison.each_pair): which pairs were compared, the correction, and
    each pair's primary endpoint and secondary family; none when only the chosen pair was compared."""
    pairs, patching = page.tables.get("pairs", pl.DataFrame()), page.primary
    rows = pairs.filter(pl.col("patching") == patching) if not pairs.is_empty() else pairs
    if rows.is_empty():
        return []
    compared = [
        pair_name(a, b) for a, b in rows.select("first", "second").unique(maintain_order=True).iter_rows()
    ]
    k = len(compared)
    text = (
        f"comparison.each_pair: every pair of method labels compared as the answer compares its pair, "
        f"first minus second ({k} pairs: {', '.join(compared)}; {patching} patching). Bonferroni correction "
        f"across the pairs: each pair's adjusted p (primary: raw; secondary: Holm within the pair) is "
        f"multiplied by {k}, and a verdict needs it below alpha (1 - circuits.ci_level), so each pair is "
        f"judged at alpha / {k}. Each pair's procedure keeps its false-positive rate at most alpha (checked "
        f"by simulation, docs/method.md); by the union bound the chance of any false verdict across the {k} "
        "pairs stays at most alpha. The answer above is the chosen pair (comparison.methods), uncorrected."
    )
    stated = rows.filter(pl.col("role").is_in(["primary", "secondary"]) & (pl.col("training") == "sft-rl"))
    reported = {pair_name(a, b) for a, b in stated.select("first", "second").iter_rows()}
    unmatched = [pair for pair in compared if pair not in reported]
    if unmatched:
        text += f" Not compared (no level reached by enough runs of both labels): {', '.join(unmatched)}."
    out = []
    # Pair by pair (as compared), each pair's primary endpoint first.
    names = [pair_name(a, b) for a, b in stated.select("first", "second").iter_rows()]
    ordered = stated.with_columns(pl.Series("pair", names, dtype=pl.String))
    ordered = ordered.sort(
        pl.col("pair").replace_strict(compared, list(range(k))), pl.col("role") != "primary"
    )
    for row in ordered.iter_rows(named=True):
        # The verdicts name the sft slot: here the pair's first label.
        first = shown((row["first"], row["second"]))[0]
        named = {HIGHER: f"higher under {first}", LOWER: f"lower under {first}"}
        out.append(
            {
                "pair": row["pair"],
                "metric": metric_label(row["metric"]),
                "matched at": f"{AXIS_NAMES[row['matched_by']]} {sig3(row['matched_at'])}",
                "role": row["role"],
                "first - second": f"{row['mean']:+.3g}",
                "p": sig3(row["p_value"]) if row["p_value"] is not None else "-",
                f"p (adjusted, x{k})": sig3(row["p_adjusted"]) if row["p_adjusted"] is not None else "-",
                "across seeds": named.get(row["verdict_seeds"], row["verdict_seeds"] or "-"),
                "these runs": named.get(row["verdict_runs"], row["verdict_runs"] or "-"),
                "n (first/second)": f"{row['n_runs_sft']}/{row['n_runs_rl']}",
            }
        )
    return [
        ("h2", "Every pair of method labels (Bonferroni across pairs)"),
        ("p", text),
        ("table", pl.DataFrame(out)),
    ]
