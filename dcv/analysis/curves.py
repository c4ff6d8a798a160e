"""The faithfulness-curve tables (``faithfulness_areas``, ``faithfulness_curve_means``,
``faithfulness_area_means``): ``dcv.circuits.curves.curve_tables`` on the circuits stage's curves and the
checkpoints table; their report section (``section``): the areas of one step's curves, the last step every
method reached.
"""

from __future__ import annotations

import polars as pl

from dcv.analysis.inputs import Analysis
from dcv.analysis.section import Block, Page
from dcv.circuits.curves import curve_tables
from dcv.matched import TRAINING_METHODS
from dcv.tables import faithfulness_curves


def build(a: Analysis) -> dict[str, pl.DataFrame]:
    return curve_tables(faithfulness_curves(a.circuits), a.checkpoints)


def shown_curves(tables: dict[str, pl.DataFrame], patching: str) -> tuple[str, int] | None:
    """The patching method and step whose curves the report shows (its figure and section): ``patching``
    where it has curves, else the first method that does; None where no step has every method's curve."""
    means = tables.get("faithfulness_curve_means", pl.DataFrame())
    curved = means["patching"].unique().sort().to_list() if means.height else []
    curving = patching if patching in curved else (curved[0] if curved else None)
    step = curve_step(means, curving) if curving else None
    return None if step is None else (curving, step)


def section(page: Page) -> list[Block]:
    """The base ranking's CPR and CMD at the shown step, base and each method."""
    shown = shown_curves(page.tables, page.primary)
    if shown is None:
        return []
    curving, step = shown
    areas = page.tables["faithfulness_area_means"]
    return [
        ("h2", "Faithfulness curves: where the base circuit breaks (CPR, CMD)"),
        *[("p", line) for line in curve_lines(areas, curving, step)],
        ("table", areas.filter(pl.col("patching") == curving)),
    ]


def curve_step(means: pl.DataFrame, patching: str) -> int | None:
    """The last step at which every fine-tuning method has a faithfulness curve (probe "mean")."""
    rows = means.filter(
        (pl.col("patching") == patching) & (pl.col("probe") == "mean") & (pl.col("n_runs") > 0)
    )
    steps = [set(rows.filter(pl.col("training") == t)["step"].to_list()) for t in TRAINING_METHODS]
    common = set.intersection(*steps) - {0} if steps else set()
    return max(common) if common else None


def curve_lines(area_means: pl.DataFrame, patching: str, step: int) -> list[str]:
    """One sentence: CPR and CMD of the base and of each method at ``step``, with n."""
    rows = area_means.filter((pl.col("patching") == patching) & (pl.col("probe") == "mean"))
    parts = []
    for training, at in (("base", 0), *((t, step) for t in TRAINING_METHODS)):
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
