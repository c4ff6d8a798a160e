"""The same numbers either way: the session's tiny_run (trained by dcv's sweep) measured again through the
external source, pointed at its own checkpoint folders, gives every analysis table of the first run."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml
from polars.testing import assert_frame_equal

from dcv.storage import analysis_dir, results_dir, trials_dir
from tests.helpers import DcvRun, fault_env

pytestmark = [pytest.mark.e2e, pytest.mark.ray]

# Columns that name where a model lies, not what it measured: the base snapshot is each run's own.
PATH_COLUMNS = ("checkpoint",)
# What only a training run has: the loss or reward since the previous checkpoint.
TRAIN_COLUMNS = ("train/loss", "train/reward")


def external_runs(storage: Path) -> list[dict]:
    """The external section that names a finished sweep's trials and their checkpoint folders."""
    runs = []
    for trial in sorted(p for p in trials_dir(storage).iterdir() if (p / "trial.json").is_file()):
        meta = json.loads((trial / "trial.json").read_text())
        assert meta["init"] == "base", meta  # the tiny run trains both methods from the base
        checkpoints = [{"step": c["step"], "path": c["path"]} for c in meta["checkpoints"]]
        runs.append(
            {
                "run": meta["trial"],
                "method": meta["method"],
                "seed": meta["seed"],
                "learning_rate": meta["learning_rate"],
                "checkpoints": checkpoints,
            }
        )
    return runs


def comparable(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.drop([c for c in (*PATH_COLUMNS, *TRAIN_COLUMNS) if c in frame.columns])


def test_external_source_gives_every_analysis_table_of_the_sweep(tiny_run, tmp_path):
    assert tiny_run.run.proc.returncode == 0, tiny_run.run.output()
    raw = yaml.safe_load(tiny_run.config.read_text())
    raw["storage"] = {"root": str(tmp_path / "store")}
    raw["external"] = {"runs": external_runs(tiny_run.storage)}
    config = tmp_path / "external.yaml"
    config.write_text(yaml.safe_dump(raw))
    run = DcvRun(["run", str(config)], cwd=tmp_path, env=fault_env(), log=tmp_path / "run.stderr")
    run.finish(1200)
    assert run.proc.returncode == 0, run.output()
    print("\n".join(run.lines))  # the first screen of `dcv run` on an external source
    assert run.saw("external runs, 4 checkpoints (4 evaluated, 0 skipped)"), run.stdout

    # The results table: the same checkpoints with the same evaluation, re-done from the folders.
    trained = pl.read_parquet(results_dir(tiny_run.storage) / "checkpoints.parquet")
    measured = pl.read_parquet(results_dir(tmp_path / "store") / "checkpoints.parquet")
    assert_frame_equal(
        comparable(measured), comparable(trained), check_exact=False, rtol=1e-5, atol=1e-6, check_dtypes=False
    )
    tables = sorted(p.name for p in analysis_dir(tiny_run.storage).glob("*.parquet"))
    assert tables == sorted(p.name for p in analysis_dir(tmp_path / "store").glob("*.parquet"))
    assert len(tables) >= 10, tables
    for name in tables:
        first = pl.read_parquet(analysis_dir(tiny_run.storage) / name)
        second = pl.read_parquet(analysis_dir(tmp_path / "store") / name)
        try:
            assert_frame_equal(comparable(second), comparable(first), check_exact=False, rtol=1e-5, atol=1e-6)
        except AssertionError as exc:
            raise AssertionError(f"analysis table {name}: {exc}") from None
