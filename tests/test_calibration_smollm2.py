"""`dcv calibrate` end to end on the real SmolLM2-135M (its base model does capitals): planted damage
goes through the base snapshot, the Ray Data patching pipeline, the circuits stage and the per-checkpoint
numbers, and a rerun reuses every patching item."""

from __future__ import annotations

import polars as pl
import pytest
import yaml

from dcv.calibration import calibration_path
from tests.helpers import DEMO_CONFIG, run_dcv

pytestmark = [pytest.mark.e2e, pytest.mark.model, pytest.mark.ray]  # `dcv calibrate` on SmolLM2


def test_dcv_calibrate_detects_an_ablated_capitals_head_and_not_the_copy(tmp_path):
    raw = yaml.safe_load(DEMO_CONFIG.read_text())
    raw["storage"] = {"root": str(tmp_path / "store")}
    raw["probes"] = [{"name": "capitals", "n_items": 16, "seed": 0}]
    raw["patching"].update(num_actors=1)
    raw["circuits"].update(n_bootstrap=200, noise_floor_resamples=100)
    raw["benchmarks"] = {"tasks": []}
    raw["calibration"].update(probes=["capitals"])
    config = tmp_path / "calibrate.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = run_dcv("calibrate", str(config), "--k", "1", cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "capitals: minimum detectable damage k = 1" in out.stdout
    table = pl.read_parquet(calibration_path(tmp_path / "store"))
    rows = {r["kind"]: r for r in table.iter_rows(named=True)}
    assert set(rows) == {"circuit", "random", "copy"}
    assert rows["copy"]["circuit_vulnerability_abs"] == 0.0 and not rows["copy"]["flagged"]
    assert rows["circuit"]["detected"] and rows["circuit"]["v_ci_low"] > 0 and rows["circuit"]["below_floor"]
    assert rows["random"]["circuit_vulnerability_abs"] < rows["circuit"]["circuit_vulnerability_abs"]
    # The planted weights are deleted once the table is written (0.54 GB each); what was measured stays.
    models = tmp_path / "store" / "calibration" / "models"
    assert not list(models.rglob("*.safetensors")) and list(models.rglob("dcv_planted.json"))
    # Rerun: every patching item is reused (a planted model is planted again, in seconds, then dropped).
    items = {p: p.stat().st_mtime_ns for p in (tmp_path / "store" / "patching" / "items").glob("*.parquet")}
    assert items
    again = run_dcv("calibrate", str(config), "--k", "1", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in items} == items
    assert pl.read_parquet(calibration_path(tmp_path / "store")).equals(table)
