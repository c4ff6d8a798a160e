"""What relates to forgetting: ``correlations`` (Spearman of V with forgetting), and each patching
method's ``predictors`` and ``weight_vs_function`` tables (``dcv.predictors``); their report section
(``section``: the tables, and per forgetting measure the sentences saying which predictor is best).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from dcv.analysis.inputs import Analysis, Inputs, point_numbers
from dcv.analysis.section import Block, Page, sig3
from dcv.config import ExperimentConfig
from dcv.matched import TRAINING_METHODS, Run, checkpoint_numbers
from dcv.metrics import PREDICTORS
from dcv.predictors import (
    FIXED_EFFECT,
    GROUPS,
    MIN_VERDICT_RUNS,
    NOT_DISTINGUISHABLE,
    PREDICTORS_SCHEMA,
    RAZOR_R2,
    TARGETS,
    WEIGHT_FUNCTION_SCHEMA,
    predictor_table,
    spearman,
    weight_function_table,
)


def correlation_table(checkpoints: pl.DataFrame, summary: pl.DataFrame) -> pl.DataFrame:
    """Spearman of V(M) with forgetting over fine-tuned checkpoints (step > 0), probes in means."""
    tuned_probes = checkpoints.filter((pl.col("step") > 0) & pl.col("in_means"))
    tuned_mean = summary.filter(pl.col("step") > 0).with_columns(pl.lit("mean").alias("probe"))
    rows = []
    for frame in (tuned_probes, tuned_mean):
        for (probe, patching), group in frame.group_by("probe", "patching", maintain_order=True):
            for training in (*TRAINING_METHODS, "pooled"):
                rows_of = group if training == "pooled" else group.filter(pl.col("training") == training)
                v = rows_of["circuit_vulnerability"].cast(pl.Float64).fill_null(np.nan).to_numpy()
                rows.append(
                    {
                        "probe": probe,
                        "patching": patching,
                        "training": training,
                        "n_checkpoints": rows_of.height,
                        "spearman_forgetting": spearman(v, rows_of["forgetting"].to_numpy()),
                        "spearman_forgetting_ld": spearman(v, rows_of["forgetting_ld"].to_numpy()),
                    }
                )
    schema = {
        "probe": pl.String,
        "patching": pl.String,
        "training": pl.String,
        "n_checkpoints": pl.Int64,
        "spearman_forgetting": pl.Float64,
        "spearman_forgetting_ld": pl.Float64,
    }
    return pl.DataFrame(rows, schema=schema).sort("probe", "patching", "training")


def method_tables(
    cfg: ExperimentConfig, data: Inputs, runs: Sequence[Run], draws: Sequence, changes: dict[str, np.ndarray]
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(predictors, weight_vs_function) of one patching method, from the matched comparison's draws."""
    observed = {
        r.name: np.stack([checkpoint_numbers(p, data.refs, data.layout) for p in r.points]) for r in runs
    }
    a, level = cfg.analysis, cfg.circuits.ci_level
    predictors = predictor_table(
        data.method,
        runs,
        observed,
        data.layout,
        draws,
        a.predictors,
        level,
        refs=data.refs,
        item_split=a.predictor_item_split,
    )
    tuned = [
        (row["method"], row["trial"], row["step"], row["model"], point_numbers(data, row))
        for row in data.rows
        if row["step"] > 0
    ]
    return predictors, weight_function_table(data.method, tuned, data.refs, data.layout, changes)


def build(a: Analysis) -> dict[str, pl.DataFrame]:
    return {
        "correlations": correlation_table(a.checkpoints, a.summary),
        "predictors": pl.concat(a.predictors) if a.predictors else pl.DataFrame(schema=PREDICTORS_SCHEMA),
        "weight_vs_function": pl.concat(a.weight_vs_function)
        if a.weight_vs_function
        else pl.DataFrame(schema=WEIGHT_FUNCTION_SCHEMA),
    }


def section(page: Page) -> list[Block]:
    """V against forgetting, what predicts forgetting (sentences, then the table) and, with the
    weight-change stage, weight change against function change."""
    tables, primary = page.tables, page.primary
    blocks: list[Block] = [
        ("h2", "Circuit vulnerability vs forgetting (Spearman over fine-tuned checkpoints)"),
        ("table", tables["correlations"]),
        ("h2", "What predicts forgetting"),
    ]
    blocks += [("p", line) for line in predictor_paragraphs(tables["predictors"], primary)]
    blocks += [
        (
            "p",
            "R² of the least-squares line of forgetting on each predictor over every fine-tuned checkpoint "
            "(predictors.png: the scatter; predictors_r2.png: ours beside RL's Razor's R² of KL for LLMs; "
            "razor_pareto.png: target accuracy against prior score with each method's frontier). "
            "versus_best: the R² gap to the group's best predictor in the same bootstrap draws; a gap "
            "whose CI includes 0 is not distinguishable at this power. Many comparisons, no correction.",
        ),
        ("table", predictor_rows(tables["predictors"], primary)),
    ]
    weight_function = tables["weight_vs_function"].filter(pl.col("patching") == primary)
    if weight_function.is_empty():
        return blocks
    return blocks + [
        ("h2", "Weight change against function change (Spearman of head weight change with v_h)"),
        (
            "p",
            "Per base-circuit head: its relative Frobenius weight change against the base (q, k, v rows "
            "and o columns; under GQA a k/v group's change is attributed to every head of the group) "
            "beside v_h, the share of its base role it lost. pooled: every (head, checkpoint) pair of "
            "the method. A head whose weights moved but whose function did not: change > 0, v_h ~ 0.",
        ),
        ("table", weight_function.sort("probe", "training", "trial", "step", nulls_last=True)),
    ]


def _ci(row: dict, value: str) -> str:
    return f"{sig3(row[value])} [{sig3(row[f'{value}_ci_low'])}, {sig3(row[f'{value}_ci_high'])}]"


def _names(labels: list[str]) -> str:
    return ", ".join(labels[:-1]) + (" and " if len(labels) > 1 else "") + labels[-1]


def predictor_paragraphs(predictors: pl.DataFrame, patching: str) -> list[str]:
    """The section's sentences, per forgetting measure: within each method first (the best R² with its
    leave-one-run-out R² and n), then pooled with a method effect (the best, the ones not distinguishable
    from it or below it, and what each adds to the method alone), then pooled without it, and the
    steps-only baseline; then the pairs not reported because they read the same items, RL's Razor's R² of
    KL beside ours, and what was not measured."""
    rows = predictors.filter(pl.col("patching") == patching)
    ok = rows.filter(pl.col("status") == "ok")
    out = []
    for target in TARGETS:
        sentences = [_group_sentence(ok, target, training) for training in GROUPS]
        if not any(sentences):
            continue
        text = f"{TARGETS[target]}. " + " ".join(s for s in sentences if s)
        out.append(text + _steps_sentence(ok, target))
    same = rows.filter(pl.col("status") == "same items")
    for (note,), frame in same.group_by("note", maintain_order=True):
        pairs = frame.unique(["predictor", "forgetting"], maintain_order=True)
        labels = sorted({PREDICTORS[n].label for n in pairs["predictor"]})
        targets = [TARGETS[t] for t in TARGETS if t in set(pairs["forgetting"])]
        out.append(
            f"Not reported (same items): {_names(labels)} against {_names(targets)}, {note}. A predictor "
            "read from the items that measure the forgetting is the forgetting again (under a uniform "
            "shrink of every LD, V absolute and forgetting as mean LD give R² = 1 by construction)."
        )
    kl = rows.filter(
        (pl.col("predictor") == "kl_to_base") & (pl.col("training") == "pooled") & (pl.col("status") == "ok")
    )
    if not kl.is_empty():
        parts = []
        for row in kl.iter_rows(named=True):
            if row["r2_ci_low"] <= RAZOR_R2 <= row["r2_ci_high"]:
                where = f"its CI contains {RAZOR_R2}"
            else:
                where = (
                    f"{'below' if row['r2_ci_high'] < RAZOR_R2 else 'above'} {RAZOR_R2} (the CI excludes it)"
                )
            parts.append(f"on {TARGETS[row['forgetting']]} R² = {_ci(row, 'r2')}, {where}")
        out.append(
            "RL's Razor (Shenfeld et al. 2025) finds forgetting tracks the forward KL to the base on the new "
            f"task with R² about {RAZOR_R2} for LLMs (and rules out weight change), pooled over its runs; "
            "here KL to base pooled without a method effect gives "
            + "; ".join(parts)
            + ". Our KL is measured on the target task's prompts as theirs, on far fewer and smaller models."
        )
    missing = sorted(set(rows.filter(pl.col("status") == "not measured")["predictor"].to_list()))
    notes = [f"{PREDICTORS[n].label} (needs {PREDICTORS[n].needs})" for n in missing]
    if "cmap" not in set(rows["predictor"].to_list()):
        notes.append(f"{PREDICTORS['cmap'].label} (needs {PREDICTORS['cmap'].needs})")
    if notes:
        out.append("Not measured here: " + "; ".join(notes) + ".")
    if ok.is_empty():
        out.insert(0, "No predictor could be fitted: fewer than 3 fine-tuned checkpoints have both numbers.")
    return out


_GROUP_WORDS = {
    "sft": "Within SFT",
    "rl": "Within RL",
    FIXED_EFFECT: "Pooled with a method effect, forgetting = a_method + b x",
    "pooled": "Pooled without it, forgetting = a + b x (RL's Razor's fit)",
}


def _group_sentence(ok: pl.DataFrame, target: str, training: str) -> str:
    """One group's sentence: its best predictor with CI, leave-one-run-out R² and n; pooled with the method
    effect also the others against it and what each adds to the method alone."""
    group = ok.filter((pl.col("forgetting") == target) & (pl.col("training") == training)).sort(
        "r2", descending=True
    )
    if group.is_empty():
        return ""
    best = group.row(0, named=True)
    n = f"n = {best['n_checkpoints']} fine-tuned checkpoints of {best['n_runs']} runs"
    if training == FIXED_EFFECT:
        n += f"; 95% CIs from the hierarchical bootstrap over runs and items, {best['n_resamples']} draws"
    text = (
        f"{_GROUP_WORDS[training]} ({n}): the highest R² is {PREDICTORS[best['predictor']].label}'s, "
        f"{_ci(best, 'r2')} (leave-one-run-out {sig3(best['r2_loro'])}, slope {sig3(best['slope'])})"
    )
    if training != FIXED_EFFECT:
        return text + "."
    others = group.slice(1)
    verdicts = others["versus_best"].to_list()
    tied = [
        PREDICTORS[n].label for n in others.filter(pl.col("versus_best") == NOT_DISTINGUISHABLE)["predictor"]
    ]
    below = [PREDICTORS[n].label for n in others.filter(pl.col("versus_best") == "below best")["predictor"]]
    untested = [v for v in verdicts if v.startswith(f"{NOT_DISTINGUISHABLE} (")]
    if tied:
        verb = "is" if len(tied) == 1 else "are"
        text += f"; {_names(tied)} {verb} not distinguishable from it at this power (the CI of the R² gap "
        text += "in the same draws includes 0)"
    if below:
        verb = "predicts" if len(below) == 1 else "predict"
        text += f"; {_names(below)} {verb} it less well (the gap's CI excludes 0)"
    if untested:
        text += (
            f"; no predictor is ranked against it: {untested[0][len(NOT_DISTINGUISHABLE) + 2 : -1]}, and the "
            f"run bootstrap under-covers below {MIN_VERDICT_RUNS} runs of a method"
        )
    adds = ", ".join(
        f"{PREDICTORS[r['predictor']].short} {sig3(r['r2'] - r['r2_method_only'])}"
        for r in group.iter_rows(named=True)
    )
    return (
        text
        + f". The method alone gives R² {sig3(best['r2_method_only'])}; beyond it each predictor adds {adds} "
        "(one that only separates the methods adds nothing)."
    )


def _steps_sentence(ok: pl.DataFrame, target: str) -> str:
    """The steps-only baseline per group, and the predictors no better than it with the method effect."""
    rows = ok.filter(pl.col("forgetting") == target)
    steps = {r["training"]: r for r in rows.filter(pl.col("predictor") == "steps").iter_rows(named=True)}
    if not steps:
        return ""
    words = {
        "sft": "within SFT",
        "rl": "within RL",
        FIXED_EFFECT: "with the method effect",
        "pooled": "pooled",
    }
    values = ", ".join(f"{sig3(r['r2'])} {words[t]}" for t, r in steps.items())
    text = f" The steps-only baseline (how long the run trained) has R² {values}"
    if FIXED_EFFECT in steps:
        floor = steps[FIXED_EFFECT]["r2"]
        fe = rows.filter((pl.col("training") == FIXED_EFFECT) & (pl.col("predictor") != "steps"))
        weaker = [PREDICTORS[n].label for n in fe.filter(pl.col("r2") <= floor)["predictor"]]
        text += (
            f"; with the method effect {_names(weaker)} {'does' if len(weaker) == 1 else 'do'} no better"
            if weaker
            else "; every predictor does better with the method effect"
        )
    return text + "."


def predictor_rows(predictors: pl.DataFrame, patching: str) -> pl.DataFrame:
    """The predictors table as the report shows it, per forgetting measure: within each method first, then
    pooled with the method effect, then pooled; one cell per number with its CI, n beside; "same items"
    rows with their note and no numbers."""
    rows = predictors.filter((pl.col("patching") == patching) & (pl.col("status") != "not measured"))
    if rows.is_empty():
        return pl.DataFrame()

    def cell(v: str) -> pl.Expr:
        # A CI that holds one value is printed as such, never as an interval (the headline's rule).
        low, high, mean = pl.col(f"{v}_ci_low"), pl.col(f"{v}_ci_high"), pl.col(v).round_sig_figs(3)
        interval = pl.format("{} [{}, {}]", mean, low.round_sig_figs(3), high.round_sig_figs(3))
        return (
            pl.when(low == high).then(pl.format("{} (no interval)", mean)).otherwise(interval).fill_null("-")
        )

    def number(v: str) -> pl.Expr:
        return pl.col(v).round_sig_figs(3).cast(pl.String).fill_null("-")

    order = {"forgetting": list(TARGETS), "training": list(GROUPS), "predictor": list(PREDICTORS)}
    keys = [pl.col(c).replace_strict(v, list(range(len(v))), default=len(v)) for c, v in order.items()]
    return rows.sort(keys).select(
        "forgetting",
        "training",
        "predictor",
        "status",
        cell("r2").alias("R² [95% CI]"),
        number("r2_method_only").alias("R² method alone"),
        number("r2_loro").alias("R² leave-one-run-out"),
        number("slope"),
        cell("spearman").alias("Spearman [95% CI]"),
        pl.col("versus_best").fill_null("-"),
        pl.format("{} / {}", "n_checkpoints", "n_runs").alias("n (checkpoints / runs)"),
        pl.col("note").fill_null(""),
    )
