"""The report's first section, "The answer" (what the two methods did, how sure, what could not have
been detected), and the calibration section behind its detection sentence: the prose, the answer table and
its notes, from the headline, base-circuit and calibration tables. `dcv.experiment` prints the same answer
on the console and logs it to MLflow."""

from __future__ import annotations

import polars as pl

from dcv.analysis.headline import UNRESOLVED
from dcv.analysis.section import AXIS_NAMES, DEFAULT_LABELS, Block, Labels, Page, shown, sig3
from dcv.detection import PRECISION, failing_metrics, plant_table, verdict_table
from dcv.matched import MAX_RUNS_NEEDED, TRAINING_METHODS
from dcv.metrics import METRICS
from dcv.metrics import label as metric_label


def _interval(low, high) -> str:
    return "-" if low is None or high is None else f"[{sig3(low)}, {sig3(high)}]"


def representative_levels(headline: pl.DataFrame, patching: str) -> dict[str, float]:
    """Per axis, the level the answer states: the highest level both methods reach with enough runs (most
    adaptation, most drift, latest step); the secondary family's levels
    (``dcv.analysis.headline.stated_levels``)."""
    used = headline.filter((pl.col("patching") == patching) & (pl.col("status") != "insufficient runs"))
    return {
        axis: float(rows["matched_at"].max())
        for (axis,), rows in used.group_by("matched_by", maintain_order=True)
    }


def _span(values: list[int]) -> str:
    """A run count as "2", or as "2-3" where the levels differ."""
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


def _runs_needed(row: dict) -> str:
    if row["runs_needed"] is not None:
        n = row["runs_needed"]
        return f"about {n} runs per method would detect a difference of this size (80% power)"
    return (
        f"no run count up to {MAX_RUNS_NEEDED} per method would detect it: the item part of its variance "
        "alone is too large (more probe items, or a larger difference)"
    )


def primary_sentence(
    headline: pl.DataFrame,
    patching: str,
    primary: dict | None = None,
    calibration: pl.DataFrame | None = None,
    base_circuits: pl.DataFrame | None = None,
    labels: Labels = DEFAULT_LABELS,
) -> str:
    """The answer's first sentence: the primary endpoint's verdict at both levels of claim, with n (and,
    where its metric fails its positive control in ``calibration``, that it does)."""
    a, b = shown(labels)
    rows = headline.filter((pl.col("patching") == patching) & (pl.col("role") == "primary"))
    if rows.is_empty():
        what = (
            f"{metric_label(primary['metric'])} at matched {AXIS_NAMES[primary['axis']]}"
            if primary
            else "as configured"
        )
        return (
            f"Primary endpoint ({what}): not compared: no level of that axis is reached by enough runs of "
            f"each method (analysis.min_runs), so this experiment makes no primary {a}-vs-{b} claim."
        )
    row = rows.row(0, named=True)
    name = metric_label(row["metric"])
    where = f"{AXIS_NAMES[row['matched_by']]} {sig3(row['matched_at'])}"
    n = f"n = {row['n_runs_sft']} {a} and {row['n_runs_rl']} {b} runs"
    if row["status"] == "no variation":
        return (
            f"Primary endpoint, {name} at matched {where} ({n}): {a} - {b} = {sig3(row['mean'])}, every draw."
        )
    seeds = (
        f"across seeds (Welch t, df {sig3(row['seed_df'])}): {row['verdict_seeds']} "
        f"(p = {sig3(row['p_value'])}, 95% CI {_interval(row['seed_ci_low'], row['seed_ci_high'])})"
    )
    if row["verdict_seeds"] == UNRESOLVED:
        seeds += f"; {_runs_needed(row)}"
    runs = (
        f"in these runs (item bootstrap): {row['verdict_runs']} "
        f"(95% CI {_interval(row['ci_low'], row['ci_high'])})"
    )
    lead = f"Primary endpoint, {name} at matched {where} ({n}): {a} - {b} = {row['mean']:+.3g}"
    failing = failing_metrics(calibration, in_means_probes(base_circuits, patching)).get(row["metric"])
    caveat = f" Its metric fails its positive control in this calibration: {failing}." if failing else ""
    return f"{lead}; {seeds}; {runs}.{caveat}"


def in_means_probes(base_circuits: pl.DataFrame | None, patching: str) -> list[str] | None:
    """The probes in the means of P, J and V for one patching method (None: not known)."""
    if base_circuits is None or "in_means" not in base_circuits.columns:
        return None
    rows = base_circuits.filter((pl.col("method") == patching) & pl.col("in_means"))
    return rows["probe"].to_list()


def answer_table(
    headline: pl.DataFrame,
    patching: str,
    calibration: pl.DataFrame | None = None,
    base_circuits: pl.DataFrame | None = None,
    labels: Labels = DEFAULT_LABELS,
) -> pl.DataFrame:
    """The answer as a table: the primary endpoint and the secondary family, metric x axis: SFT, RL,
    SFT - RL with both levels' CIs and verdicts, Holm-adjusted p, n per method, the chance level and how
    far above it each method is (P, J). A
    secondary metric that fails its positive control in ``calibration`` (``failing_metrics``) is left out
    (its p still counted in the Holm family: conservative)."""
    rows = headline.filter(pl.col("patching") == patching)
    if "role" not in rows.columns:
        return pl.DataFrame()
    failing = list(failing_metrics(calibration, in_means_probes(base_circuits, patching)))
    diffs = rows.filter(
        (pl.col("training") == "sft-rl")
        & (
            (pl.col("role") == "primary")
            | ((pl.col("role") == "secondary") & ~pl.col("metric").is_in(failing))
        )
    )
    if diffs.is_empty():
        return pl.DataFrame()
    a, b = shown(labels)
    keys = ["matched_by", "matched_at", "metric"]
    per_method = rows.filter(pl.col("training").is_in(["sft", "rl"])).select(
        *keys, "training", "mean", "chance", "ci_low", "ci_high"
    )
    out = []
    for row in diffs.sort(pl.col("role") != "primary", "matched_by", "metric").iter_rows(named=True):
        method = {
            r["training"]: r
            for r in per_method.filter(
                (pl.col("matched_by") == row["matched_by"])
                & (pl.col("matched_at") == row["matched_at"])
                & (pl.col("metric") == row["metric"])
            ).iter_rows(named=True)
        }
        chance = [method.get(t, {}).get("chance") for t in TRAINING_METHODS]
        out.append(
            {
                "metric": metric_label(row["metric"]),
                "matched at": f"{AXIS_NAMES[row['matched_by']]} {sig3(row['matched_at'])}",
                "role": row["role"],
                a: sig3(method["sft"]["mean"]) if "sft" in method else "-",
                b: sig3(method["rl"]["mean"]) if "rl" in method else "-",
                f"{a} - {b}": f"{row['mean']:+.3g}",
                "these runs [95% CI]": _interval(row["ci_low"], row["ci_high"]),
                "these runs": row["verdict_runs"] or "-",
                "across seeds [95% CI]": _interval(row["seed_ci_low"], row["seed_ci_high"]),
                "p": sig3(row["p_adjusted"]) if row["p_adjusted"] is not None else "-",
                "across seeds": row["verdict_seeds"] or "-",
                f"n ({a}/{b})": f"{row['n_runs_sft']}/{row['n_runs_rl']}",
                f"chance ({a}/{b})": "-" if None in chance else f"{sig3(chance[0])}/{sig3(chance[1])}",
                f"above chance, these runs ({a}/{b})": "-"
                if None in chance
                else " / ".join(_above_chance(method[t]) for t in TRAINING_METHODS),
            }
        )
    return pl.DataFrame(out).rename({"p": "p (primary raw, others Holm)"})


def _above_chance(row: dict) -> str:
    """A method's value less its chance level, with its these-runs CI (the chance level is fixed: it
    depends on circuit sizes only, which every draw keeps)."""
    d = row["mean"] - row["chance"]
    low, high = (None if row[c] is None else row[c] - row["chance"] for c in ("ci_low", "ci_high"))
    return f"{d:+.3g} {_interval(low, high)}"


def text_table(frame: pl.DataFrame) -> str:
    """A frame as fixed-width text (the console's and MLflow's rendering of the answer table)."""
    if frame.is_empty():
        return ""
    columns = frame.columns
    cells = [[str(v) for v in row] for row in frame.iter_rows()]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def answer_notes(
    headline: pl.DataFrame,
    base_circuits: pl.DataFrame,
    patching: str,
    calibration: pl.DataFrame | None,
    labels: Labels = DEFAULT_LABELS,
) -> list[str]:
    """What the answer rests on: the counts, how to read the two levels of claim, the multiplicity rule,
    the levels used, what was left out, and what the experiment can detect."""
    a, b = shown(labels)
    rows = headline.filter(pl.col("patching") == patching)
    items = rows.row(0, named=True)
    per_probe = items.get("probe_items")
    # One count when every probe has it; else each probe's, so no n is understated.
    same = per_probe is None or len({part.rsplit(" ", 1)[-1] for part in per_probe.split(", ")}) == 1
    counts = (f"{items['n_probe_items']} items per probe, " if same else f"probe items {per_probe}, ") + (
        f"{items['n_target_items']} target test items"
        if items["n_target_items"]
        else "target items not resampled"
    )
    levels = representative_levels(headline, patching)
    out = []
    if not levels:
        best = rows.select(pl.col("n_runs_sft").max(), pl.col("n_runs_rl").max()).row(0)
        out.append(
            "Insufficient runs: no level of target accuracy, KL to base or step is reached by at least 2 "
            f"runs of each method (at best {best[0]} {a} and {best[1]} {b} runs reach a level), so this "
            f"experiment makes no {a}-vs-{b} claim ({patching} patching; {counts})."
        )
    else:
        stated = rows.filter(
            pl.col("role").is_in(["primary", "secondary"]) & (pl.col("training") == "sft-rl")
        )
        n_sft, n_rl = (_span(sorted(set(stated[c].to_list()))) for c in ("n_runs_sft", "n_runs_rl"))
        reached = rows.filter(pl.col("start_reached") > 0)
        out.append(
            f"How to read it: {n_sft} {a} and {n_rl} {b} runs, {counts} ({patching} patching). 'These runs' "
            "holds the trained checkpoints fixed: its CI (item bootstrap over probe and target items) says "
            f"what these models did, at any number of runs. 'Across seeds' is the claim about {a} and {b} in "
            "general: Welch's t on the runs' values with the item variance folded in, whose false-positive "
            "rate is at most 5% at 2, 3 and 5 runs per method (bench/null_calibration.py). The primary "
            "endpoint's p is unadjusted; the secondary rows (every other answer metric at each axis's "
            f"highest level: {stated.filter(pl.col('role') == 'secondary').height} comparisons) are "
            "Holm-adjusted as one family, at both levels of claim (the CIs are unadjusted: a secondary CI "
            "that excludes 0 beside 'not distinguishable' is that correction)."
            + (
                f" At some accuracy levels a run's resampled base already reached the level in up to "
                f"{reached['start_reached'].max():.0%} of draws: those draws leave that run out (no run is "
                "matched at its step 0)."
                if not reached.is_empty()
                else ""
            )
        )
        for axis in levels:
            used = rows.filter((pl.col("matched_by") == axis) & (pl.col("status") != "insufficient runs"))
            short = rows.filter((pl.col("matched_by") == axis) & (pl.col("status") == "insufficient runs"))
            levels_text = ", ".join(sig3(v) for v in sorted(used["matched_at"].unique().to_list()))
            out.append(
                f"Levels of {AXIS_NAMES[axis]} used: {levels_text}"
                + (f"; {short.height} more have insufficient runs" if short.height else "")
                + " (every level's numbers are in the headline table; only the highest is stated here)."
            )
    excluded = {m.name: m.excluded_because for m in METRICS.values() if m.excluded_because}
    failing = failing_metrics(calibration, in_means_probes(base_circuits, patching))
    for name, reason in (failing | excluded).items():
        how = reason if name in excluded else f"fails its positive control in this calibration ({reason})"
        out.append(f"{metric_label(name)} is not in the answer: it {how}.")
    left_out = base_circuits.filter((pl.col("method") == patching) & ~pl.col("in_means"))
    for row in left_out.iter_rows(named=True):
        out.append(f"Probe {row['probe']} is left out of the means: {row['excluded_because']}.")
    out.append("What this experiment can detect: " + detection_sentence(calibration, rows, labels))
    return out


def answer_paragraphs(
    headline: pl.DataFrame,
    base_circuits: pl.DataFrame,
    patching: str,
    calibration: pl.DataFrame | None,
    primary: dict | None = None,
    labels: Labels = DEFAULT_LABELS,
) -> list[str]:
    """The report's first section as text: the primary endpoint's verdict in one sentence, the answer
    table (fixed-width), then the notes (``answer_notes``). ``primary``: analysis.primary, for saying
    what could not be compared."""
    rows = headline.filter(pl.col("patching") == patching)
    if rows.is_empty():
        return ["No matched comparison: the results hold no fine-tuned run of one of the methods."]
    table = text_table(answer_table(headline, patching, calibration, base_circuits, labels))
    return [
        primary_sentence(headline, patching, primary, calibration, base_circuits, labels),
        *([table] if table else []),
        *answer_notes(headline, base_circuits, patching, calibration, labels),
    ]


def detection_sentence(
    calibration: pl.DataFrame | None, headline: pl.DataFrame, labels: Labels = DEFAULT_LABELS
) -> str:
    """The calibration's minimum detectable damage and the headline's minimum detectable differences."""
    a, b = shown(labels)
    parts = []
    if calibration is None:
        parts.append("no planted-damage calibration was run (calibration.enabled: false, or `dcv calibrate`)")
    elif calibration.is_empty():
        parts.append("nothing could be calibrated (no probe the base model does has a base circuit)")
    else:
        parts += calibration_findings(calibration)
    differences = headline.filter((pl.col("training") == "sft-rl") & pl.col("mde").is_not_null())
    for metric in ("circuit_vulnerability_abs", "preservation", "forgetting"):
        stated = differences.filter(pl.col("metric") == metric)
        # A level where nothing varied has an MDE of 0: no n can resolve a difference there, so it is no
        # detection limit (every model scored alike on every draw).
        rows = stated.filter((pl.col("status") == "ok") & (pl.col("mde") > 0))
        if rows.is_empty() and not stated.is_empty():
            parts.append(
                f"{metric_label(metric)} did not vary between runs or items at any matched level (every "
                "model scored alike), so no minimum detectable difference can be given for it"
            )
        elif not rows.is_empty():
            parts.append(
                f"{a} - {b} differences in {metric_label(metric)} below {sig3(rows['mde'].min())}-"
                f"{sig3(rows['mde'].max())} cannot be seen at these counts (80% power)"
            )
    return "; ".join(parts) + "."


def calibration_findings(calibration: pl.DataFrame) -> list[str]:
    """Per calibrated probe: the weakest planted damage each metric detects, the metrics that rank circuit
    plants above random plants of the same size, and those that fail their positive control (and why);
    then how often the base at numerical precision (the negative control) was flagged."""
    parts = []
    for (probe,), rows in verdict_table(calibration).group_by("probe", maintain_order=True):
        rows = list(rows.iter_rows(named=True))
        found = [
            f"{metric_label(r['metric'])} from the top {r['min_detectable_k']} head(s) "
            + (
                "ablated"
                if r["min_detectable_alpha"] == 0
                else f"scaled by {sig3(r['min_detectable_alpha'])}"
            )
            for r in rows
            if r["min_detectable_k"] is not None
        ]
        ks = calibration.filter((pl.col("probe") == probe) & (pl.col("kind") == "circuit"))["k"]
        text = (
            f"on {probe}, the weakest planted damage detected: " + ", ".join(found)
            if found
            else f"on {probe}, no planted damage up to {ks.max()} heads was detected by any metric"
        )
        separating = [
            f"{metric_label(r['metric'])} (k = {r['separates_at_k']})" for r in rows if r["separates_at_k"]
        ]
        text += (
            "; circuit plants rank above random plants of the same size under " + ", ".join(separating)
            if separating
            else "; no metric ranks circuit plants above random plants of the same size"
        )
        failing = [
            f"{metric_label(r['metric'])}: {r['failure']}"
            for r in rows
            if r["passes_positive_control"] is False
        ]
        if failing:
            text += "; failing the positive control: " + "; ".join(failing)
        parts.append(text)
    precision = calibration.filter(pl.col("kind") == PRECISION)
    if not precision.is_empty():
        flagged = precision.filter(pl.col("flagged"))
        which = ", ".join(
            f"{metric_label(m)} on {p}" for p, m in flagged.select("probe", "metric").iter_rows()
        )
        parts.append(
            "the base at numerical precision (its weights through bfloat16), the negative control, was "
            f"flagged in {flagged.height} of {precision.height} metric checks"
            + (f" (false positives: {which})" if which else "")
        )
    return parts


def answer_section(page: Page) -> list[Block]:
    """The answer first: the primary endpoint's sentence, the answer table and its notes."""
    headline, base, primary = page.tables["headline"], page.tables["base_circuits"], page.primary
    labels = page.labels
    a, b = shown(labels)
    blocks: list[Block] = [("h2", f"The answer: {a} vs {b} (patching method {primary})")]
    if headline.filter(pl.col("patching") == primary).is_empty():
        lines = answer_paragraphs(headline, base, primary, page.calibration, page.primary_endpoint, labels)
        return blocks + [("p", line) for line in lines]
    return [
        *blocks,
        ("p", primary_sentence(headline, primary, page.primary_endpoint, page.calibration, base, labels)),
        ("table", answer_table(headline, primary, page.calibration, base, labels)),
        *[("p", line) for line in answer_notes(headline, base, primary, page.calibration, labels)],
    ]


def calibration_section(page: Page) -> list[Block]:
    if page.calibration is None or page.calibration.is_empty():
        return []
    return [
        ("h2", "Calibration: planted damage on the base model"),
        ("table", plant_table(page.calibration)),
        ("table", verdict_table(page.calibration)),
    ]
