"""A report section: what it reads (``Page``) and gives (``Block``s), and the number format its prose shares.

Each table family of this package holds the report section(s) of its tables, as functions
``(page: Page) -> list[Block]`` beside its ``build``. ``dcv.report.SECTIONS`` lists them in the report's
order with the report's own sections (the answer, about, calibration, figures, stage times); ``dcv.report``
draws the figures first and renders the blocks. A section never plots: a figure changes in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

Block = tuple[str, object]  # ("h2" | "p", text), ("table", frame) or ("img", a figure's path)
Labels = tuple[str, str]  # the two method labels compared (comparison.methods): the sft and rl slots
DEFAULT_LABELS: Labels = ("sft", "rl")

AXIS_NAMES = {"accuracy": "target accuracy", "kl": "KL to base", "step": "step"}


@dataclass(frozen=True)
class Page:
    """What every report section reads."""

    tables: dict[str, pl.DataFrame]  # the analysis tables by name (dcv.analysis.TABLES)
    primary: str  # the patching method the report leads with: the first of the checkpoints table's
    about: Sequence[str]  # the "About this experiment" lines
    stage_seconds: dict
    calibration: pl.DataFrame | None  # the calibration stage's table (None: not run)
    primary_endpoint: dict | None  # analysis.primary, named where it could not be compared
    figures: list[Path]  # every figure drawn, in the order the Figures section shows them
    labels: Labels = DEFAULT_LABELS  # what the prose calls the tables' sft and rl slots


def shown(labels: Labels) -> tuple[str, str]:
    """The two labels as the report's prose writes them: "SFT", "RL"; "DPO", "RLVR"."""
    return labels[0].upper(), labels[1].upper()


def sig3(x: float) -> str:
    """A number in the report's prose: three significant figures."""
    return f"{x:.3g}"
