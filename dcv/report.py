"""Figures and tables for people: head-effect heatmaps now; the experiment report builds on these."""

from __future__ import annotations

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
    limit = float(np.nanmax(np.abs(grid))) or 1.0
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * n_heads, 1.0 + 0.25 * n_layers))
    image = ax.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", origin="lower")
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
