"""The experiment report: its sections in order (``SECTIONS``: first "The answer", `dcv.analysis.answer`,
then each table family's sections from `dcv.analysis`), the figures, and the rendering as Markdown and one
self-contained HTML page."""

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
from dcv.analysis.answer import answer_section, calibration_section  # noqa: E402
from dcv.analysis.headline import dcv_point  # noqa: E402
from dcv.analysis.section import DEFAULT_LABELS, Block, Labels, Page, shown  # noqa: E402
from dcv.metrics import PREDICTORS  # noqa: E402
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


def about_section(page: Page) -> list[Block]:
    return [("h2", "About this experiment")] + [("p", line) for line in page.about]


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
