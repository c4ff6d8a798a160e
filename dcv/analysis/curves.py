"""The faithfulness-curve tables (``faithfulness_areas``, ``faithfulness_curve_means``,
``faithfulness_area_means``): ``dcv.circuits.curves.curve_tables`` on the circuits stage's curves and the
checkpoints table.
"""

from __future__ import annotations

import polars as pl

from dcv.analysis.inputs import Analysis
from dcv.circuits.curves import curve_tables
from dcv.tables import faithfulness_curves


def build(a: Analysis) -> dict[str, pl.DataFrame]:
    return curve_tables(faithfulness_curves(a.circuits), a.checkpoints)
