"""`dcv eval` end to end on the tiny model, through the installed console script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
DCV = Path(sys.executable).with_name("dcv")


def run_dcv(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([str(DCV), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_dcv_eval_tiny_prints_scores_and_logs_to_mlflow(tiny_config_file, tmp_path):
    result = run_dcv("eval", str(tiny_config_file), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for task in ("target", "probe:ioi", "probe:capitals", "probe:greater_than", "probe:induction"):
        assert any(line.startswith(task) for line in lines), result.stdout
    db = tmp_path / "storage" / "mlflow.db"
    assert db.is_file()
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("tiny-test")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`dcv.stage` = 'eval'")
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    assert metrics["target/n_items"] == 8
    assert 0 <= metrics["probe/ioi/accuracy"] <= 1
    target_line = next(line for line in lines if line.startswith("target"))
    assert f"{metrics['target/accuracy']:.3f}" in target_line
    assert not (tmp_path / "mlruns").exists()  # nothing written to the working directory


def test_dcv_eval_of_another_model_reports_kl_to_base(tiny_config_file, tmp_path):
    result = run_dcv(
        "eval", str(tiny_config_file), "--model", "tiny", "--set", "model.tiny.seed=1", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    # --set changes the base too, so the model scored equals the base: no KL line
    assert "KL(base || model)" not in result.stdout


def test_dcv_eval_bad_config_exits_2_before_loading(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: tiny}\nprobes: [{name: ioi}]\nsft: {learning_rate: -1}\n")
    result = run_dcv("eval", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    assert "sft.learning_rate" in result.stderr and str(bad) in result.stderr
    result = run_dcv("eval", str(bad).replace("bad", "absent"), cwd=tmp_path)
    assert result.returncode == 2 and "no such config file" in result.stderr
