"""The experiment report: its first section, "The answer" (what SFT vs RL did, how sure, what could not
have been detected), then the tables and figures behind it, as Markdown and one self-contained HTML page."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from dcv import analysis  # noqa: E402
from dcv.analysis.headline import UNRESOLVED, dcv_point  # noqa: E402
from dcv.analysis.section import AXIS_NAMES, DEFAULT_LABELS, Block, Labels, Page, shown, sig3  # noqa: E402
from dcv.detection import PRECISION, failing_metrics, plant_table, verdict_table  # noqa: E402
from dcv.matched import MAX_RUNS_NEEDED, TRAINING_METHODS  # noqa: E402
from dcv.metrics import METRICS, PREDICTORS  # noqa: E402
from dcv.metrics import label as metric_label  # noqa: E402
from dcv.predictors import RAZOR_R2, TARGETS  # noqa: E402
from dcv.storage import atomic_path  # noqa: E402


def plot_head_heatmap(
    effects: pl.DataFrame,
    path: Path,
    title: str,
    marked: Sequence[tuple[int, int]] = (),
    value: str = "effect",
) -> Path:
    """A layer x head heatmap of ``value`` (diverging, centred on 0); ``marked`` heads get a box."""
    n_layers, n_heads = int(effects["layer"].max()) + 1, int(effects["head"].max()) + 1
    grid = np.full((n_layers, n_heads), np.nan)
    for layer, head, v in effects.select("layer", "head", value).iter_rows():
        grid[layer, head] = v
    finite = np.abs(grid[np.isfinite(grid)])
    limit = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * n_heads, 1.0 + 0.25 * n_layers))
    # Heads without a value (outside a circuit) in grey, apart from a value of 0.
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#dddddd")
    image = ax.imshow(grid, cmap=cmap, vmin=-limit, vmax=limit, aspect="auto", origin="lower")
    for layer, head in marked:
        ax.add_patch(
            plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.5)
        )
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_heads))
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label=value)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return Path(path)


# --- the experiment report -------------------------------------------------------------------------

METHOD_COLORS = {"sft": "tab:red", "rl": "tab:blue"}
LINESTYLES = ("-", "--", ":", "-.")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)


def _band(ax, frame: pl.DataFrame, y: str, keys: Sequence[str], label_of) -> None:
    """One line per ``keys`` group: the mean of ``y`` over its runs per step, shaded min-max over runs."""
    for index, (key, group) in enumerate(frame.group_by(keys, maintain_order=True)):
        stats = group.group_by("step").agg(
            pl.col(y).mean().alias("mean"), pl.col(y).min().alias("low"), pl.col(y).max().alias("high")
        )
        stats = stats.sort("step")
        color = METHOD_COLORS.get(key[0], "tab:gray")
        style = LINESTYLES[index % len(LINESTYLES)]
        ax.plot(stats["step"], stats["mean"], style, color=color, marker="o", ms=3, label=label_of(key))
        ax.fill_between(stats["step"], stats["low"], stats["high"], color=color, alpha=0.15)


def _lr_label(key) -> str:
    # External runs may not say their learning rate (external.runs[].learning_rate: None).
    return key[0].upper() if key[1] is None else f"{key[0].upper()} lr {key[1]:g}"


def plot_adaptation(summary: pl.DataFrame, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    _band(ax, summary, "target_accuracy", ["training", "learning_rate"], _lr_label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("target accuracy")
    ax.set_title("Adaptation: target-task accuracy (mean, band = min-max over seeds)", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_forgetting(summary: pl.DataFrame, path: Path) -> Path:
    panels = [
        ("forgetting", "forgetting (probe accuracy drop)"),
        ("forgetting_ld", "forgetting (mean logit-difference drop)"),
    ]
    if summary["forgetting_bench"].null_count() < summary.height:
        panels.append(("forgetting_bench", "forgetting (benchmark accuracy drop)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6))
    for ax, (column, label) in zip(axes, panels, strict=True):
        _band(ax, summary, column, ["training", "learning_rate"], _lr_label)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle("Forgetting of prior capabilities (means over probes / benchmarks)", fontsize=9)
    return _save(fig, path)


def plot_pareto(summary: pl.DataFrame, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    seen = set()
    for (_, training), run in summary.group_by("trial", "training", maintain_order=True):
        run = run.sort("step")
        label = training.upper() if training not in seen else None
        seen.add(training)
        color = METHOD_COLORS.get(training, "tab:gray")
        ax.plot(run["forgetting_ld"], run["target_accuracy"], "-o", color=color, ms=3, alpha=0.7, label=label)
    ax.set_xlabel("prior-task forgetting (mean LD drop; lower is better)")
    ax.set_ylabel("new-task accuracy")
    ax.set_title("New task vs prior tasks (each run's checkpoints in step order)", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_preservation(checkpoints: pl.DataFrame, path: Path) -> Path:
    probes = checkpoints["probe"].unique().sort().to_list()
    fig, axes = plt.subplots(1, len(probes), figsize=(3.2 * len(probes), 3.2), squeeze=False)
    for ax, probe in zip(axes[0], probes, strict=True):
        rows = checkpoints.filter(pl.col("probe") == probe)
        floor = rows["noise_floor_preservation"].drop_nulls()
        if floor.len():
            # The base circuit against itself on resampled items (5th percentile): above it, no difference.
            ax.axhspan(float(floor[0]), 1.0, color="tab:gray", alpha=0.15, label="base vs base (noise floor)")
        _band(ax, rows, "preservation", ["training"], lambda key: key[0].upper())
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(probe, fontsize=9)
        ax.set_xlabel("optimizer step")
    axes[0][0].set_ylabel("base-circuit preservation")
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def plot_vulnerability_vs_forgetting(checkpoints: pl.DataFrame, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    tuned = checkpoints.filter(pl.col("step") > 0)
    markers = dict(zip(tuned["probe"].unique().sort().to_list(), "osD^vP*X", strict=False))
    for (training, probe), rows in tuned.group_by("training", "probe", maintain_order=True):
        ax.scatter(
            rows["circuit_vulnerability"],
            rows["forgetting_ld"],
            color=METHOD_COLORS.get(training, "tab:gray"),
            marker=markers[probe],
            s=18,
            alpha=0.75,
            label=f"{training.upper()} {probe}",
        )
    ax.set_xlabel("circuit vulnerability V(M)")
    ax.set_ylabel("forgetting (LD drop)")
    ax.set_title("Circuit vulnerability vs forgetting (fine-tuned checkpoints)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def plot_dcv_heatmap(dcv_heads: pl.DataFrame, shape: tuple[int, int], path: Path, title: str) -> Path:
    """DCV_h of the base-circuit heads on the full layer x head grid (other heads blank)."""
    grid = pl.DataFrame(
        {
            "layer": [la for la in range(shape[0]) for _ in range(shape[1])],
            "head": list(range(shape[1])) * shape[0],
        },
        schema={"layer": pl.Int32, "head": pl.Int32},
    ).join(dcv_heads.select("layer", "head", "dcv"), on=["layer", "head"], how="left")
    return plot_head_heatmap(
        grid.with_columns(pl.col("dcv").fill_null(float("nan"))), path, title, value="dcv"
    )


def circuit_heads_of(base_circuits: pl.DataFrame, patching: str) -> list[tuple[int, int]]:
    """The heads of the base circuits in the means (``base_circuits``' "layer.head" lists), once each."""
    rows = base_circuits.filter((pl.col("method") == patching) & pl.col("in_means"))
    heads = {tuple(int(x) for x in h.split(".")) for c in rows["circuit"].to_list() for h in c.split()}
    return sorted(heads)


def plot_weight_change_heatmap(
    heads: pl.DataFrame,
    shape: tuple[int, int],
    marked: Sequence[tuple[int, int]],
    path: Path,
    labels: Labels = DEFAULT_LABELS,
) -> Path:
    """Each head's relative weight change (``weight_change_heads``) at each method's last step, mean over
    runs, and the first method's less the second's; the base-circuit heads in the means get a box (the
    DCV heatmaps' heads)."""
    grids, titles = [], []
    for training, label in zip(("sft", "rl"), shown(labels), strict=True):
        rows = heads.filter(pl.col("training") == training)
        if rows.is_empty():
            continue
        step = int(rows["step"].max())
        grid = np.full(shape, np.nan)
        for layer, head, v in (
            rows.filter(pl.col("step") == step).select("layer", "head", "change").iter_rows()
        ):
            grid[layer, head] = v
        grids.append(grid)
        titles.append(f"{label} step {step}: ||dW||/||W|| per head")
    if len(grids) == 2:
        grids.append(grids[0] - grids[1])
        titles.append(" - ".join(shown(labels)))
    fig, axes = plt.subplots(
        1, len(grids), figsize=(1.5 + 3.2 * len(grids), max(2.6, 1.2 + 0.2 * shape[0])), squeeze=False
    )
    top = max(float(np.nanmax(g)) for g in grids[:2]) if grids else 1.0
    for i, (ax, grid, title) in enumerate(zip(axes[0], grids, titles, strict=True)):
        if i < 2:
            image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=top or 1.0, aspect="auto", origin="lower")
        else:
            limit = float(np.nanmax(np.abs(grid))) or 1.0
            image = ax.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", origin="lower")
        for layer, head in marked:
            ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.2))
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("head")
        ax.set_xticks(range(shape[1]))
        fig.colorbar(image, ax=ax)
    axes[0][0].set_ylabel("layer")
    fig.suptitle("Weight change per head (boxes: base-circuit heads in the means)", fontsize=9)
    return _save(fig, path)


def _predictor_column(frame: pl.DataFrame, name: str) -> np.ndarray:
    p = PREDICTORS[name]
    values = frame[p.entry].cast(pl.Float64).fill_null(np.nan).to_numpy()
    return 1.0 - values if p.complement else values


def plot_predictors(summary: pl.DataFrame, predictors: pl.DataFrame, path: Path) -> Path | None:
    """Forgetting against each predictor over the fine-tuned checkpoints, per method (pooled R^2 in the
    panel title)."""
    ok = predictors.filter(pl.col("status") == "ok")
    names = [n for n in PREDICTORS if n in ok["predictor"].to_list()]
    targets = [t for t in TARGETS if t in ok["forgetting"].to_list()]
    if not names or not targets:
        return None
    tuned = summary.filter(pl.col("step") > 0)
    fig, axes = plt.subplots(
        len(targets), len(names), figsize=(2.6 * len(names), 2.3 * len(targets)), squeeze=False
    )
    for i, target in enumerate(targets):
        for j, name in enumerate(names):
            ax = axes[i][j]
            for training, rows in tuned.group_by("training", maintain_order=True):
                y = rows[target].cast(pl.Float64).fill_null(np.nan).to_numpy()
                color = METHOD_COLORS.get(training[0], "tab:gray")
                ax.scatter(_predictor_column(rows, name), y, s=14, color=color, label=training[0].upper())
            pooled = ok.filter(
                (pl.col("predictor") == name)
                & (pl.col("forgetting") == target)
                & (pl.col("training") == "pooled")
            )
            r2 = f"R² {pooled['r2'][0]:.2f}" if not pooled.is_empty() else "R² -"
            ax.set_title(f"{PREDICTORS[name].short} ({r2})", fontsize=7)
            ax.tick_params(labelsize=6)
            if j == 0:
                ax.set_ylabel(TARGETS[target], fontsize=7)
    axes[0][0].legend(fontsize=6)
    fig.suptitle("Forgetting against each candidate predictor (fine-tuned checkpoints)", fontsize=9)
    return _save(fig, path)


def plot_predictor_r2(predictors: pl.DataFrame, path: Path) -> Path | None:
    """Pooled R^2 of each predictor with its CI, per forgetting measure, beside RL's Razor's (KL, LLMs)."""
    ok = predictors.filter((pl.col("status") == "ok") & (pl.col("training") == "pooled"))
    targets = [t for t in TARGETS if t in ok["forgetting"].to_list()]
    if not targets:
        return None
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.4), squeeze=False)
    for ax, target in zip(axes[0], targets, strict=True):
        rows = ok.filter(pl.col("forgetting") == target)
        names = [n for n in PREDICTORS if n in rows["predictor"].to_list()]
        rows = {r["predictor"]: r for r in rows.iter_rows(named=True)}
        r2 = [rows[n]["r2"] for n in names]
        err = [
            [rows[n]["r2"] - rows[n]["r2_ci_low"] for n in names],
            [rows[n]["r2_ci_high"] - rows[n]["r2"] for n in names],
        ]
        x = np.arange(len(names))
        ax.bar(
            x, r2, yerr=np.clip(err, 0, None), color="tab:purple", alpha=0.75, capsize=3, label="dcv (95% CI)"
        )
        ax.bar(
            [len(names)], [RAZOR_R2], color="tab:gray", hatch="//", alpha=0.6, label="RL's Razor: KL, LLMs"
        )
        ax.set_xticks(list(x) + [len(names)])
        ax.set_xticklabels(
            [PREDICTORS[n].short for n in names] + ["RL's Razor KL"], rotation=45, ha="right", fontsize=6
        )
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("R² (pooled over methods)", fontsize=7)
        first = next(iter(rows.values()))
        ax.set_title(
            f"{TARGETS[target]} (n = {first['n_checkpoints']} ckpts, {first['n_runs']} runs)", fontsize=8
        )
    axes[0][0].legend(fontsize=6)
    return _save(fig, path)


def prior_scores(checkpoints: pl.DataFrame) -> pl.DataFrame:
    """Per (trial, step): target accuracy and the prior score, the mean probe accuracy over the prior
    probes the base model does (forgetting's probes)."""
    return (
        checkpoints.filter(pl.col("in_forgetting"))
        .group_by("trial", "training", "step", maintain_order=True)
        .agg(pl.col("target_accuracy").first(), pl.col("probe_accuracy").mean().alias("prior_score"))
        .sort("trial", "step")
    )


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats on both x and y (higher is better), by x descending."""
    order = np.lexsort((-y, -x))
    front, best = [], -np.inf
    for i in order:
        if y[i] > best:
            front.append(i)
            best = y[i]
    return np.array(front, dtype=np.int64)


def plot_razor_pareto(checkpoints: pl.DataFrame, path: Path) -> Path:
    """RL's Razor's view: new-task accuracy against prior-task score, every checkpoint, per method, with
    each method's Pareto frontier (no checkpoint of that method is better on both)."""
    scores = prior_scores(checkpoints)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for (training,), rows in scores.group_by("training", maintain_order=True):
        x, y = rows["target_accuracy"].to_numpy(), rows["prior_score"].to_numpy()
        color = METHOD_COLORS.get(training, "tab:gray")
        ax.scatter(x, y, s=16, color=color, alpha=0.6, label=f"{training.upper()} checkpoints")
        # The frontier by x ascending: at x in (x_i-1, x_i] the best prior score reachable is y_i's.
        front = pareto_front(x, y)
        fx, fy = x[front][::-1], y[front][::-1]
        ax.step(fx, fy, where="pre", color=color, linewidth=1.5, label=f"{training.upper()} frontier")
    ax.set_xlabel("new-task (target) accuracy")
    ax.set_ylabel("prior-task score (mean probe accuracy)")
    ax.set_title("RL's Razor view: new task vs prior tasks, with each method's frontier", fontsize=9)
    if scores.is_empty():  # no checkpoint has a prior score (no competent probe): say so, draw no legend
        ax.text(
            0.5, 0.5, "no checkpoint with a prior score", ha="center", va="center", transform=ax.transAxes
        )
    else:
        ax.legend(fontsize=7)
    return _save(fig, path)


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


def _cell_text(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _markdown_table(frame: pl.DataFrame) -> str:
    if frame.is_empty():
        return "_(no rows)_"

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(_cell_text(v) for v in row) + " |" for row in frame.iter_rows()]
    return "\n".join(lines)


def _html_table(frame: pl.DataFrame) -> str:
    if frame.is_empty():
        return "<p><em>(no rows)</em></p>"

    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    cells = ("".join(f"<td>{html.escape(_cell_text(v))}</td>" for v in row) for row in frame.iter_rows())
    body = "".join(f"<tr>{row}</tr>" for row in cells)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(blocks: Sequence[Block], folder: Path, title: str) -> tuple[Path, Path]:
    """``report.md`` (figures beside it) and a self-contained ``report.html`` (figures embedded)."""
    md, body = [f"# {title}", ""], []
    for kind, value in blocks:
        if kind == "h2":
            md += [f"## {value}", ""]
            body.append(f"<h2>{html.escape(str(value))}</h2>")
        elif kind == "p":
            md += [str(value), ""]
            body.append(f"<p>{html.escape(str(value))}</p>")
        elif kind == "table":
            md += [_markdown_table(value), ""]
            body.append(_html_table(value))
        elif kind == "img":
            path = Path(value)
            md += [f"![{path.stem}]({path.relative_to(folder)})", ""]
            data = base64.b64encode(path.read_bytes()).decode()
            body.append(f'<figure><img alt="{path.stem}" src="data:image/png;base64,{data}"></figure>')
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
        "font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}"
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{''.join(body)}</body></html>"
    )
    md_path, html_path = folder / "report.md", folder / "report.html"
    with atomic_path(md_path) as tmp:
        tmp.write_text("\n".join(md))
    with atomic_path(html_path) as tmp:
        tmp.write_text(page)
    return md_path, html_path


def plot_faithfulness_curves(means: pl.DataFrame, patching: str, step: int, path: Path) -> Path:
    """F(C_k(base), M) over circuit size (fraction of heads, log axis) per fine-tuning method at one step
    (mean over runs of the mean over probes in means), the base model's curve beside them."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    rows = means.filter((pl.col("patching") == patching) & (pl.col("probe") == "mean"))
    for training, at, color in (("base", 0, "black"), *((t, step, c) for t, c in METHOD_COLORS.items())):
        curve = rows.filter((pl.col("training") == training) & (pl.col("step") == at)).sort("fraction")
        if curve.height:
            n = int(curve["n_runs"].min())
            label = "base" if training == "base" else f"{training.upper()} step {step} (n = {n} runs)"
            ax.plot(curve["fraction"], curve["faithfulness"], "-o", ms=3, color=color, label=label)
    ax.axhline(1.0, color="tab:gray", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("circuit size (fraction of heads, top-k of the base ranking)")
    ax.set_ylabel("faithfulness F(C_k(base), M)")
    ax.set_title(f"Faithfulness curves ({patching}; mean over probes in means)", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def draw_figures(
    tables: dict[str, pl.DataFrame], figures: Path, primary: str, labels: Labels = DEFAULT_LABELS
) -> list[Path]:
    """Every figure of the report into ``figures``, in the order the Figures section shows them: the
    primary patching method's curves and scatters, the faithfulness curves, then the heatmaps (titled with
    the compared ``labels``)."""
    a, b = shown(labels)
    summary, checkpoints = tables["summary"], tables["checkpoints"]
    main = summary.filter(pl.col("patching") == primary)
    main_checkpoints = checkpoints.filter(pl.col("patching") == primary)
    pngs = [
        plot_adaptation(main, figures / "adaptation.png"),
        plot_forgetting(main, figures / "forgetting.png"),
        plot_pareto(main, figures / "pareto.png"),
        plot_preservation(main_checkpoints, figures / "preservation.png"),
        plot_vulnerability_vs_forgetting(main_checkpoints, figures / "vulnerability_vs_forgetting.png"),
        plot_razor_pareto(main_checkpoints, figures / "razor_pareto.png"),
    ]
    predictors = tables["predictors"].filter(pl.col("patching") == primary)
    pngs += [
        p
        for p in (
            plot_predictors(main, predictors, figures / "predictors.png"),
            plot_predictor_r2(predictors, figures / "predictors_r2.png"),
        )
        if p is not None
    ]
    curves = analysis.curves.shown_curves(tables, primary)
    if curves is not None:
        means = tables["faithfulness_curve_means"]
        pngs.append(plot_faithfulness_curves(means, *curves, figures / "faithfulness_curves.png"))
    base, dcv_heads, weight_heads = (
        tables["base_circuits"],
        tables["dcv_heads"],
        tables["weight_change_heads"],
    )
    if not weight_heads.is_empty():
        shape = (int(base["n_layers"][0]), int(base["heads_per_layer"][0]))
        marked = circuit_heads_of(base, primary)
        pngs.append(
            plot_weight_change_heatmap(weight_heads, shape, marked, figures / "weight_change.png", labels)
        )
    if not dcv_heads.is_empty():
        shape = (int(base["n_layers"][0]), int(base["heads_per_layer"][0]))
        for (probe, patching), rows in dcv_heads.group_by("probe", "patching", maintain_order=True):
            point = dcv_point(rows)
            by, value = point["by"][0], point["value"][0]
            pngs.append(
                plot_dcv_heatmap(
                    point,
                    shape,
                    figures / f"dcv_{probe}_{patching}.png",
                    f"DCV = v({a}) - v({b}), {probe} ({patching}), matched {by} = {value:.3g}",
                )
            )
    return pngs


# The report's own sections: those that read more than one table family, or no analysis table.


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


def about_section(page: Page) -> list[Block]:
    return [("h2", "About this experiment")] + [("p", line) for line in page.about]


def calibration_section(page: Page) -> list[Block]:
    if page.calibration is None or page.calibration.is_empty():
        return []
    return [
        ("h2", "Calibration: planted damage on the base model"),
        ("table", plant_table(page.calibration)),
        ("table", verdict_table(page.calibration)),
    ]


def figures_section(page: Page) -> list[Block]:
    return [("h2", "Figures")] + [("img", p) for p in page.figures]


def stage_times_section(page: Page) -> list[Block]:
    if not page.stage_seconds:
        return []
    seconds = page.stage_seconds
    times = pl.DataFrame({"stage": list(seconds), "seconds": [float(v) for v in seconds.values()]})
    return [("h2", "Stage wall times (last run of each stage)"), ("table", times)]


# The report, top to bottom: each table family's sections (dcv.analysis) among the report's own.
SECTIONS = (
    answer_section,
    about_section,
    analysis.headline.grid_section,
    analysis.pairs.section,
    calibration_section,
    analysis.checkpoints.base_circuits_section,
    analysis.paper.section,
    analysis.checkpoints.benchmarks_section,
    analysis.noise_floor.section,
    analysis.checkpoints.after_sft_section,
    analysis.predictors.section,
    analysis.cmap.section,
    analysis.curves.section,
    analysis.headline.top_heads_section,
    figures_section,
    analysis.checkpoints.every_checkpoint_section,
    stage_times_section,
)


def build_report(
    tables: dict[str, pl.DataFrame],
    folder: Path,
    title: str,
    about: Sequence[str],
    stage_seconds: dict,
    calibration: pl.DataFrame | None = None,
    primary_endpoint: dict | None = None,
    labels: Labels = DEFAULT_LABELS,
) -> tuple[Path, Path, list[Path]]:
    """Every figure and the report (markdown + HTML) from the analysis tables, into ``folder``;
    ``primary_endpoint``: analysis.primary (named where it could not be compared); ``labels``: the two
    method labels compared (comparison.methods), as the prose names the tables' sft and rl slots."""
    folder = Path(folder)
    primary = tables["checkpoints"]["patching"].unique().sort().to_list()[0]
    figures = draw_figures(tables, folder / "figures", primary, labels)
    page = Page(tables, primary, about, stage_seconds, calibration, primary_endpoint, figures, tuple(labels))
    md_path, html_path = render([block for section in SECTIONS for block in section(page)], folder, title)
    return md_path, html_path, figures
