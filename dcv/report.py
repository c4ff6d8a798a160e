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

from dcv.predictors import PREDICTORS, RAZOR_R2, TARGETS  # noqa: E402
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
    cmap = plt.get_cmap("RdBu_r").copy()
    cmap.set_bad("#dddddd")  # heads without a value (outside a circuit) in grey, apart from a value of 0
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
    return f"{key[0].upper()} lr {key[1]:g}"


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
    heads: pl.DataFrame, shape: tuple[int, int], marked: Sequence[tuple[int, int]], path: Path
) -> Path:
    """Each head's relative weight change (``weight_change_heads``) at each method's last step, mean over
    runs, and SFT - RL; the base-circuit heads in the means get a box (the DCV heatmaps' heads)."""
    grids, titles = [], []
    for training in ("sft", "rl"):
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
        titles.append(f"{training.upper()} step {step}: ||dW||/||W|| per head")
    if len(grids) == 2:
        grids.append(grids[0] - grids[1])
        titles.append("SFT - RL")
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


def _ci(row: dict, value: str) -> str:
    return f"{_g(row[value])} [{_g(row[f'{value}_ci_low'])}, {_g(row[f'{value}_ci_high'])}]"


def _names(labels: list[str]) -> str:
    return ", ".join(labels[:-1]) + (" and " if len(labels) > 1 else "") + labels[-1]


def predictor_paragraphs(predictors: pl.DataFrame, patching: str) -> list[str]:
    """The section's sentences: per forgetting measure, the best pooled predictor with its CI and n, the
    ones not distinguishable from it at this power and the ones below it; RL's Razor's R^2 of KL beside
    ours; what was not measured."""
    rows = predictors.filter(pl.col("patching") == patching)
    out = []
    for target in TARGETS:
        group = rows.filter(
            (pl.col("forgetting") == target) & (pl.col("training") == "pooled") & (pl.col("status") == "ok")
        ).sort("r2", descending=True)
        if group.is_empty():
            continue
        best = group.row(0, named=True)
        label = PREDICTORS[best["predictor"]].label
        others = group.slice(1)
        tied = [
            PREDICTORS[n].label for n in others.filter(pl.col("versus_best") != "below best")["predictor"]
        ]
        below = [
            PREDICTORS[n].label for n in others.filter(pl.col("versus_best") == "below best")["predictor"]
        ]
        text = (
            f"{TARGETS[target]}, pooled over SFT and RL (n = {best['n_checkpoints']} fine-tuned "
            f"checkpoints of {best['n_runs']} runs; 95% CIs from the hierarchical bootstrap over runs and "
            f"items, {best['n_resamples']} draws): the highest R² is {label}'s, {_ci(best, 'r2')} (Spearman "
            f"{_ci(best, 'spearman')})"
        )
        if tied:
            verb = "is" if len(tied) == 1 else "are"
            text += (
                f"; {_names(tied)} {verb} not distinguishable from it at this power (the CI of the R² gap "
            )
            text += "in the same draws includes 0)"
        if below:
            verb = "predicts" if len(below) == 1 else "predict"
            text += f"; {_names(below)} {verb} it less well (the gap's CI excludes 0)"
        out.append(text + ".")
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
            f"task with R² about {RAZOR_R2} for LLMs (and rules out weight change); here KL to base gives "
            + "; ".join(parts)
            + ". Our KL is measured on the target task's prompts as theirs, on far fewer and smaller models."
        )
    missing = sorted(set(rows.filter(pl.col("status") == "not measured")["predictor"].to_list()))
    notes = [f"{PREDICTORS[n].label} (needs {PREDICTORS[n].needs})" for n in missing]
    if "cmap" not in set(rows["predictor"].to_list()):
        notes.append(f"{PREDICTORS['cmap'].label} (needs {PREDICTORS['cmap'].needs})")
    out.append("Not measured here: " + "; ".join(notes) + ".")
    if not out[:-1]:
        out.insert(0, "No predictor could be fitted: fewer than 3 fine-tuned checkpoints have both numbers.")
    return out


def predictor_rows(predictors: pl.DataFrame, patching: str) -> pl.DataFrame:
    """The predictors table as the report shows it: one cell per number with its CI, n beside."""
    rows = predictors.filter((pl.col("patching") == patching) & (pl.col("status") != "not measured"))
    if rows.is_empty():
        return pl.DataFrame()

    def cell(v: str) -> pl.Expr:
        # A CI that holds one value is printed as such, never as an interval (the headline's rule).
        low, high, mean = pl.col(f"{v}_ci_low"), pl.col(f"{v}_ci_high"), pl.col(v).round_sig_figs(3)
        interval = pl.format("{} [{}, {}]", mean, low.round_sig_figs(3), high.round_sig_figs(3))
        return pl.when(low == high).then(pl.format("{} (no interval)", mean)).otherwise(interval)

    return rows.select(
        "forgetting",
        "training",
        "predictor",
        "status",
        cell("r2").alias("R² [95% CI]"),
        cell("spearman").alias("Spearman [95% CI]"),
        "versus_best",
        pl.format("{} / {}", "n_checkpoints", "n_runs").alias("n (checkpoints / runs)"),
    ).sort("forgetting", "training", "predictor")


def dcv_point(rows: pl.DataFrame) -> pl.DataFrame:
    """One matching point's DCV rows: the highest matched accuracy both methods reach with enough runs,
    else the last matched step."""
    for by in ("accuracy", "step", "kl"):
        point = rows.filter(pl.col("by") == by)
        if not point.is_empty():
            return point.filter(pl.col("value") == point["value"].max())
    return rows


AXIS_NAMES = {"accuracy": "target accuracy", "kl": "KL to base", "step": "step"}
METRIC_NAMES = {
    "target_accuracy": "target accuracy",
    "kl_to_base": "KL to base",
    "forgetting": "forgetting (probe accuracy)",
    "forgetting_ld": "forgetting (mean LD)",
    "forgetting_bench": "forgetting (benchmarks)",
    "preservation": "circuit preservation P",
    "jaccard": "circuit Jaccard J",
    "circuit_vulnerability": "circuit vulnerability V (relative)",
    "circuit_vulnerability_abs": "circuit vulnerability V (absolute)",
    "base_circuit_faithfulness": "base-circuit faithfulness",
    "n_lost": "probes lost",
}


def _g(x: float) -> str:
    return f"{x:.3g}"


def representative_levels(headline: pl.DataFrame, patching: str) -> dict[str, float]:
    """Per axis, the level the first paragraph reads: the highest level both methods reach with enough
    runs (most adaptation, most drift, latest step)."""
    used = headline.filter((pl.col("patching") == patching) & (pl.col("status") != "insufficient runs"))
    return {
        axis: float(rows["matched_at"].max())
        for (axis,), rows in used.group_by("matched_by", maintain_order=True)
    }


def _at_levels(levels: dict[str, float]) -> pl.Expr:
    """Rows of the headline at each axis's level in ``levels``."""
    return pl.any_horizontal(
        [(pl.col("matched_by") == axis) & (pl.col("matched_at") == value) for axis, value in levels.items()]
        or [pl.lit(False)]
    )


DAMAGE_METRICS = (
    "circuit_vulnerability_abs",
    "circuit_vulnerability",
    "preservation",
    "jaccard",
    "forgetting",
    "forgetting_ld",
    "forgetting_bench",
)
# The numbers the first paragraph states, in this order.
ANSWER_METRICS = (*DAMAGE_METRICS, "target_accuracy", "kl_to_base")


def summary_sentence(rows: pl.DataFrame, levels: dict[str, float]) -> str:
    """In one sentence: at the representative levels, which circuit-damage and forgetting differences
    the CIs resolve, and that the rest are not distinguishable."""
    diffs = rows.filter(
        (pl.col("training") == "sft-rl")
        & (pl.col("status") == "ok")
        & pl.col("metric").is_in(DAMAGE_METRICS)
        & _at_levels(levels)
    )
    resolved = diffs.filter((pl.col("ci_low") > 0) | (pl.col("ci_high") < 0))
    # n of the levels stated, not of the table's first row (a level may have too few runs to be used).
    at = rows.filter(_at_levels(levels))
    n_sft, n_rl = (_span(sorted(set(at[c].to_list()))) for c in ("n_runs_sft", "n_runs_rl"))
    where = ", ".join(f"{AXIS_NAMES[a]} {_g(v)}" for a, v in levels.items())
    found = [
        f"{METRIC_NAMES[r['metric']]} {'higher' if r['mean'] > 0 else 'lower'} under SFT at "
        f"{AXIS_NAMES[r['matched_by']]} {_g(r['matched_at'])}"
        for r in resolved.iter_rows(named=True)
    ]
    return (
        f"In short: with {n_sft} SFT and {n_rl} RL runs matched at {where}, "
        + (f"the CIs resolve {'; '.join(found)}; " if found else "no CI resolves a difference; ")
        + f"the other {diffs.height - resolved.height} of {diffs.height} differences in circuit damage and "
        "forgetting are not distinguishable at this power. These are many comparisons without correction: "
        "about one 95% CI in twenty excludes 0 by chance."
    )


def _span(values: list[int]) -> str:
    """A run count as "2", or as "2-3" where the levels differ."""
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


def difference_sentence(row: dict) -> str:
    """One SFT - RL difference with its CI and n, and what it may claim."""
    name = METRIC_NAMES.get(row["metric"], row["metric"])
    if row["status"] == "no variation":
        return f"{name}: SFT - RL = {_g(row['mean'])} in at least 95% of bootstrap draws (no interval)"
    cell = f"SFT - RL = {row['mean']:+.3g} [{_g(row['ci_low'])}, {_g(row['ci_high'])}]"
    if row["ci_low"] > 0 or row["ci_high"] < 0:
        verdict = "higher under SFT" if row["mean"] > 0 else "lower under SFT"
    else:
        verdict = f"not distinguishable at this power (minimum detectable difference {_g(row['mde'])})"
    return f"{name}: {cell}, {verdict}"


def answer_paragraphs(
    headline: pl.DataFrame, base_circuits: pl.DataFrame, patching: str, calibration: pl.DataFrame | None
) -> list[str]:
    """The report's first section: the matched levels used, n per method, each SFT - RL difference with
    its CI and verdict (or "insufficient runs"), what was left out, and what the experiment can detect."""
    rows = headline.filter(pl.col("patching") == patching)
    out = []
    if rows.is_empty():
        return ["No matched comparison: the results hold no fine-tuned run of one of the methods."]
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
    if not levels:
        best = rows.select(pl.col("n_runs_sft").max(), pl.col("n_runs_rl").max()).row(0)
        out.append(
            "Insufficient runs: no level of target accuracy, KL to base or step is reached by at least 2 "
            f"runs of each method (at best {best[0]} SFT and {best[1]} RL runs reach a level), so this "
            f"experiment makes no SFT-vs-RL claim ({patching} patching; {counts})."
        )
    for axis, value in levels.items():
        at = rows.filter((pl.col("matched_by") == axis) & (pl.col("matched_at") == value))
        diff = {r["metric"]: r for r in at.filter(pl.col("training") == "sft-rl").iter_rows(named=True)}
        used = rows.filter((pl.col("matched_by") == axis) & (pl.col("status") != "insufficient runs"))
        short = rows.filter((pl.col("matched_by") == axis) & (pl.col("status") == "insufficient runs"))
        first = at.row(0, named=True)
        levels_text = ", ".join(_g(v) for v in sorted(used["matched_at"].unique().to_list()))
        sentences = [difference_sentence(diff[m]) for m in ANSWER_METRICS if m in diff]
        out.append(
            f"Matched at {AXIS_NAMES[axis]} = {_g(value)} (n = {first['n_runs_sft']} SFT and "
            f"{first['n_runs_rl']} RL runs; {counts}; 95% CIs from the hierarchical bootstrap over runs, "
            "probe items and target items): "
            + "; ".join(sentences)
            + f". Levels used on this axis: {levels_text}"
            + (f"; {short.height} more levels have insufficient runs." if short.height else ".")
        )
    if levels:
        out.insert(0, summary_sentence(rows, levels))
    left_out = base_circuits.filter((pl.col("method") == patching) & ~pl.col("in_means"))
    for row in left_out.iter_rows(named=True):
        out.append(f"Probe {row['probe']} is left out of the means: {row['excluded_because']}.")
    out.append("What this experiment can detect: " + detection_sentence(calibration, rows))
    return out


def detection_sentence(calibration: pl.DataFrame | None, headline: pl.DataFrame) -> str:
    """The calibration's minimum detectable damage and the headline's minimum detectable differences."""
    parts = []
    if calibration is None:
        parts.append("no planted-damage calibration was run (calibration.enabled: false, or `dcv calibrate`)")
    elif calibration.is_empty():
        parts.append("nothing could be calibrated (no probe the base model does has a base circuit)")
    else:
        for probe, rows in calibration.group_by("probe", maintain_order=True):
            k = rows["min_detectable_k"][0]
            parts.append(
                f"on {probe[0]}, ablating the top {k} circuit head(s) is the smallest damage detected"
                if k is not None
                else f"on {probe[0]}, no planted damage up to {rows['k'].max()} heads was detected"
            )
        copy = calibration.filter(pl.col("kind") == "copy")
        if not copy.is_empty():
            flagged = int(copy["flagged"].sum())
            parts.append(f"the exact copy of the base was flagged {flagged} time(s) (false positives)")
    differences = headline.filter((pl.col("training") == "sft-rl") & pl.col("mde").is_not_null())
    for metric in ("circuit_vulnerability_abs", "preservation", "forgetting"):
        stated = differences.filter(pl.col("metric") == metric)
        # A level where nothing varied has an MDE of 0: no n can resolve a difference there, so it is no
        # detection limit (every model scored alike on every draw).
        rows = stated.filter((pl.col("status") == "ok") & (pl.col("mde") > 0))
        if rows.is_empty() and not stated.is_empty():
            parts.append(
                f"{METRIC_NAMES[metric]} did not vary between runs or items at any matched level (every "
                "model scored alike), so no minimum detectable difference can be given for it"
            )
        elif not rows.is_empty():
            parts.append(
                f"SFT - RL differences in {METRIC_NAMES[metric]} below {_g(rows['mde'].min())}-"
                f"{_g(rows['mde'].max())} cannot be seen at these counts (80% power)"
            )
    return "; ".join(parts) + "."


def headline_rows(headline: pl.DataFrame, patching: str) -> pl.DataFrame:
    """The headline at each axis's representative level as a wide table: SFT / RL / SFT-RL with CIs and n."""
    levels = representative_levels(headline, patching)
    rows = headline.filter(
        (pl.col("patching") == patching) & (pl.col("status") != "insufficient runs") & _at_levels(levels)
    )
    if rows.is_empty():
        return pl.DataFrame()
    rows = rows.with_columns(
        pl.format("{} = {}", pl.col("matched_by"), pl.col("matched_at").round(3)).alias("matched at"),
        pl.when(pl.col("status") == "no variation")
        .then(pl.format("{} (no interval)", pl.col("mean").round_sig_figs(3)))
        .otherwise(
            pl.format(
                "{} [{}, {}]",
                pl.col("mean").round_sig_figs(3),
                pl.col("ci_low").round_sig_figs(3),
                pl.col("ci_high").round_sig_figs(3),
            )
        )
        .alias("cell"),
        pl.format("{}/{}", "n_runs_sft", "n_runs_rl").alias("runs (SFT/RL)"),
    )
    return rows.pivot(on="training", index=["matched at", "metric", "runs (SFT/RL)"], values="cell").rename(
        {"sft": "SFT", "rl": "RL", "sft-rl": "SFT - RL"}, strict=False
    )


def level_table(headline: pl.DataFrame, patching: str) -> pl.DataFrame:
    """Every level of the matched grid: how many runs of each method reach it and whether it is used."""
    return (
        headline.filter(pl.col("patching") == patching)
        .group_by("matched_by", "matched_at", maintain_order=True)
        .agg(
            pl.col("n_runs_sft").first(),
            pl.col("n_runs_rl").first(),
            (pl.col("status") == "insufficient runs").all().alias("insufficient runs"),
        )
    )


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


def render(blocks: Sequence[tuple[str, object]], folder: Path, title: str) -> tuple[Path, Path]:
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


def curve_step(means: pl.DataFrame, patching: str) -> int | None:
    """The last step at which every fine-tuning method has a faithfulness curve (probe "mean")."""
    rows = means.filter(
        (pl.col("patching") == patching) & (pl.col("probe") == "mean") & (pl.col("n_runs") > 0)
    )
    steps = [set(rows.filter(pl.col("training") == t)["step"].to_list()) for t in METHOD_COLORS]
    common = set.intersection(*steps) - {0} if steps else set()
    return max(common) if common else None


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


def curve_lines(area_means: pl.DataFrame, patching: str, step: int) -> list[str]:
    """One sentence: CPR and CMD of the base and of each method at ``step``, with n."""
    rows = area_means.filter((pl.col("patching") == patching) & (pl.col("probe") == "mean"))
    parts = []
    for training, at in (("base", 0), *((t, step) for t in METHOD_COLORS)):
        row = rows.filter((pl.col("training") == training) & (pl.col("step") == at))
        if row.height and row["n_runs"][0]:
            r = row.row(0, named=True)
            name, n = ("base", "") if training == "base" else (training.upper(), f" (n = {r['n_runs']} runs)")
            parts.append(f"{name} CPR {r['cpr']:.3g}, CMD {r['cmd']:.3g}{n}")
    return [
        f"Faithfulness curves of the base circuit's ranking ({patching}; MIB's CPR = area under F over the "
        f"size fractions, higher is better; CMD = area of |1 - F|, lower is better; means over probes in "
        f"means), at step {step}, the last step every method reached (plain means over runs, not at matched "
        f"levels, no CI): " + "; ".join(parts) + "."
    ]


def build_report(
    tables: dict[str, pl.DataFrame],
    folder: Path,
    title: str,
    about: Sequence[str],
    stage_seconds: dict,
    calibration: pl.DataFrame | None = None,
) -> tuple[Path, Path, list[Path]]:
    """Every figure and the report (markdown + HTML) from the analysis tables, into ``folder``."""
    folder = Path(folder)
    figures = folder / "figures"
    summary, checkpoints = tables["summary"], tables["checkpoints"]
    patchings = checkpoints["patching"].unique().sort().to_list()
    primary = patchings[0]
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
    base = tables["base_circuits"]
    dcv_heads = tables["dcv_heads"]
    heatmaps = []
    weight_heads = tables["weight_change_heads"]
    if not weight_heads.is_empty():
        shape = (int(base["n_layers"][0]), int(base["heads_per_layer"][0]))
        marked = circuit_heads_of(base, primary)
        heatmaps.append(
            plot_weight_change_heatmap(weight_heads, shape, marked, figures / "weight_change.png")
        )
    if not dcv_heads.is_empty():
        shape = (int(base["n_layers"][0]), int(base["heads_per_layer"][0]))
        for (probe, patching), rows in dcv_heads.group_by("probe", "patching", maintain_order=True):
            point = dcv_point(rows)
            by, value = point["by"][0], point["value"][0]
            heatmaps.append(
                plot_dcv_heatmap(
                    point,
                    shape,
                    figures / f"dcv_{probe}_{patching}.png",
                    f"DCV = v(SFT) - v(RL), {probe} ({patching}), matched {by} = {value:.3g}",
                )
            )
    headline = tables["headline"]
    blocks: list[tuple[str, object]] = [("h2", f"The answer: SFT vs RL (patching method {primary})")]
    blocks += [("p", line) for line in answer_paragraphs(headline, base, primary, calibration)]
    blocks += [("table", headline_rows(headline, primary))]
    blocks += [("h2", "About this experiment")] + [("p", line) for line in about]
    blocks += [
        ("h2", "Matched grid: runs of each method at every level"),
        ("table", level_table(headline, primary)),
    ]
    if calibration is not None and not calibration.is_empty():
        blocks += [("h2", "Calibration: planted damage on the base model"), ("table", calibration)]
    blocks += [("h2", "Base circuits and the competence guard"), ("table", base)]
    blocks += [
        ("h2", "Beside the seed paper (paper_*: Qwen2.5-3B-Instruct, 576 heads, learned masks)"),
        (
            "p",
            "Ours: the base model and the final checkpoint of every run (means over runs and probes); "
            "retention = share of the base circuit's heads in the model's own circuit; faithfulness of "
            "the model's own circuit. noise_floor_retention_pct: the base circuit against the base model's "
            "circuit on bootstrap resamples of its probe items (5th percentile); retention above it is not "
            "distinguishable from base.",
        ),
        ("table", tables["paper"]),
    ]
    if len(tables["benchmarks"].columns) > 4:
        blocks += [("h2", "Standard benchmarks (lm-eval) of every checkpoint")]
        blocks += [("table", tables["benchmarks"])]
    if not tables["noise_floor"].is_empty():
        blocks += [("h2", "Noise floor of circuit discovery (base model against itself)")]
        blocks += [("table", tables["noise_floor"])]
    if not tables["after_sft"].is_empty():
        blocks += [
            ("h2", "GRPO after SFT against its SFT start point"),
            ("p", "restores_circuit: preservation above the SFT checkpoint it started from."),
            ("table", tables["after_sft"]),
        ]
    blocks += [("h2", "Circuit vulnerability vs forgetting (Spearman over fine-tuned checkpoints)")]
    blocks += [("table", tables["correlations"])]
    blocks += [("h2", "What predicts forgetting")]
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
    if not weight_function.is_empty():
        blocks += [
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
    cmap_rows = tables.get("cmap", pl.DataFrame())
    if cmap_rows.height:
        blocks += [
            ("h2", "Cross-model activation patching (cmap): did the heads' function change?"),
            (
                "p",
                "Per checkpoint, probe and direction: mean |cmap_h| over the probe's base-circuit heads "
                "(CI over resamples of its n_items probe items) and over every head cmap patched (n_heads: "
                "all of them, or the base's top heads with patching.cmap_top_heads). cmap_h swaps head h's "
                "output (after o_proj) between the base and the checkpoint on the clean prompts, over the "
                "base's LD gap only, so a checkpoint whose behaviour shrank evenly still shows; 0 means the "
                "head computes what the base's did. ckpt_into_base: the checkpoint's head in the base model; "
                "base_into_ckpt: the base's head in the checkpoint.",
            ),
            ("table", cmap_rows.filter(pl.col("patching") == primary).drop("patching")),
        ]
    curve_means = tables.get("faithfulness_curve_means", pl.DataFrame())
    curved = curve_means["patching"].unique().sort().to_list() if curve_means.height else []
    curving = primary if primary in curved else (curved[0] if curved else None)
    step = curve_step(curve_means, curving) if curving else None
    if step is not None:
        pngs.append(plot_faithfulness_curves(curve_means, curving, step, figures / "faithfulness_curves.png"))
        blocks += [("h2", "Faithfulness curves: where the base circuit breaks (CPR, CMD)")]
        blocks += [("p", line) for line in curve_lines(tables["faithfulness_area_means"], curving, step)]
        blocks += [("table", tables["faithfulness_area_means"].filter(pl.col("patching") == curving))]
    if not dcv_heads.is_empty():
        points = [dcv_point(rows) for _, rows in dcv_heads.group_by("probe", "patching")]
        top = (
            pl.concat(points)
            .sort(pl.col("dcv").abs(), descending=True)
            .group_by("probe", "patching", maintain_order=True)
            .head(5)
            .sort("probe", "patching")
        )
        blocks += [("h2", "Heads with the largest |DCV| (the heatmaps' matching point)"), ("table", top)]
    blocks += [("h2", "Figures")] + [("img", p) for p in pngs + heatmaps]
    per_step = summary.select(
        "trial",
        "step",
        "patching",
        "target_accuracy",
        "kl_to_base",
        "forgetting",
        "forgetting_ld",
        "forgetting_bench",
        "preservation",
        "jaccard",
        "noise_floor_preservation",
        "circuit_vulnerability",
        "circuit_vulnerability_abs",
        "n_lost",
    )
    blocks += [
        ("h2", "Every checkpoint (means over probes in means; lost probes counted)"),
        ("table", per_step),
    ]
    per_probe = checkpoints.filter(pl.col("step") > 0).select(
        "trial",
        "step",
        "patching",
        "probe",
        "status",
        "probe_accuracy",
        "gap",
        "base_gap",
        "preservation",
        "jaccard",
        "circuit_vulnerability",
        "circuit_vulnerability_abs",
    )
    blocks += [
        ("h2", "Every fine-tuned checkpoint per probe (status: ok, lost, below tau, ...)"),
        ("table", per_probe),
    ]
    if stage_seconds:
        times = pl.DataFrame(
            {"stage": list(stage_seconds), "seconds": [float(v) for v in stage_seconds.values()]}
        )
        blocks += [("h2", "Stage wall times (last run of each stage)"), ("table", times)]
    md_path, html_path = render(blocks, folder, title)
    return md_path, html_path, pngs + heatmaps
