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
    first = rows.row(0, named=True)
    where = ", ".join(f"{AXIS_NAMES[a]} {_g(v)}" for a, v in levels.items())
    found = [
        f"{METRIC_NAMES[r['metric']]} {'higher' if r['mean'] > 0 else 'lower'} under SFT at "
        f"{AXIS_NAMES[r['matched_by']]} {_g(r['matched_at'])}"
        for r in resolved.iter_rows(named=True)
    ]
    return (
        f"In short: with {first['n_runs_sft']} SFT and {first['n_runs_rl']} RL runs matched at {where}, "
        + (f"the CIs resolve {'; '.join(found)}; " if found else "no CI resolves a difference; ")
        + f"the other {diffs.height - resolved.height} of {diffs.height} differences in circuit damage and "
        "forgetting are not distinguishable at this power. These are many comparisons without correction: "
        "about one 95% CI in twenty excludes 0 by chance."
    )


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
    counts = f"{items['n_probe_items']} items per probe, " + (
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
    mde = headline.filter((pl.col("training") == "sft-rl") & pl.col("mde").is_not_null())
    for metric in ("circuit_vulnerability_abs", "preservation", "forgetting"):
        rows = mde.filter(pl.col("metric") == metric)
        if not rows.is_empty():
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
    ]
    base = tables["base_circuits"]
    dcv_heads = tables["dcv_heads"]
    heatmaps = []
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
