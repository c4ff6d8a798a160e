"""`dcv calibrate` end to end on the real SmolLM2-135M (its base model does capitals): graded planted
damage and the precision copy go through the base snapshot, the Ray Data patching pipeline, the circuits
stage and the per-checkpoint numbers, and a rerun reuses every patching item."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import yaml

from dcv.calibration import CALIBRATION_SCHEMA, calibration_path
from dcv.cli import main
from dcv.detection import CALIBRATION_METRICS
from tests.helpers import DEMO_CONFIG, run_dcv

pytestmark = [pytest.mark.e2e, pytest.mark.model, pytest.mark.ray]  # `dcv calibrate` on SmolLM2


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> tuple[Path, Path, pl.DataFrame]:
    """(config, storage root, table) of one `dcv calibrate --k 1` at the demo's alphas (0.5, 0): 5 planted
    models with the precision copy."""
    tmp_path = tmp_path_factory.mktemp("calibrate")
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
    assert "capitals circuit_vulnerability_abs: weakest detected k = 1 at alpha" in out.stdout
    return config, tmp_path / "store", pl.read_parquet(calibration_path(tmp_path / "store"))


def _v_abs(table: pl.DataFrame) -> dict[tuple[str, float], dict]:
    rows = table.filter(pl.col("metric") == "circuit_vulnerability_abs").iter_rows(named=True)
    return {(r["kind"], r["alpha"]): r for r in rows}


def test_dcv_calibrate_detects_graded_damage_to_a_capitals_head_and_reruns_from_its_items(
    calibrated, monkeypatch
):
    config, store, table = calibrated
    assert table.schema == CALIBRATION_SCHEMA
    assert set(table["kind"]) == {"circuit", "random", "precision"}
    assert table.height == 5 * len(CALIBRATION_METRICS)
    v = _v_abs(table)
    assert v[("precision", 1.0)]["value"] != 0.0  # the negative control differs from the base (bf16)
    ablated, halved = v[("circuit", 0.0)], v[("circuit", 0.5)]
    assert ablated["detected"] and ablated["ci_low"] > 0 and ablated["below_floor"]
    assert 0 < halved["value"] < ablated["value"]  # graded: half the output, less damage
    assert v[("random", 0.0)]["value"] < ablated["value"] and ablated["separates"]
    assert ablated["passes_positive_control"]
    # The planted weights are deleted once the table is written (0.54 GB each); what was measured stays.
    models = store / "calibration" / "models"
    assert not list(models.rglob("*.safetensors")) and list(models.rglob("dcv_planted.json"))
    # Rerun: every patching item is reused (a planted model is planted again, in seconds, then dropped).
    items = {p: p.stat().st_mtime_ns for p in (store / "patching" / "items").glob("*.parquet")}
    assert items
    # The rerun in this process (``main``): a second process would only add its imports and Ray's start.
    monkeypatch.chdir(config.parent)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["calibrate", str(config), "--k", "1"]) == 0
    assert {p: p.stat().st_mtime_ns for p in items} == items
    assert pl.read_parquet(calibration_path(store)).equals(table)


def test_the_precision_copy_is_not_flagged(calibrated):
    """The bf16 round trip moves V by ~0.0015 with a paired CI that excludes 0 (measured 2026-12-07): a
    change within the noise margin (how far item resampling alone moves V), so no damage; without the
    margin it was flagged (tests/test_calibration.py shows that instrument failing)."""
    _, _, table = calibrated
    precision = table.filter(pl.col("kind") == "precision")
    assert not precision["flagged"].any(), precision.filter(pl.col("flagged")).select("metric", "value")
