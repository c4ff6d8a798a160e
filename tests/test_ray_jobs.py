"""`ray job submit` of the ray_jobs/ entrypoints against a real Ray head on 127.0.0.1 with token auth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import polars as pl
import pytest
import yaml
from mlflow.tracking import MlflowClient

from dcv.cli import main
from dcv.config import apply_overrides, parse_config
from dcv.experiment import STAGES
from dcv.results import read_results
from dcv.storage import (
    WEIGHT_CHANGE_FILE,
    analysis_dir,
    calibration_dir,
    circuits_dir,
    patching_dir,
    weight_change_dir,
)
from dcv.training.sweep import plan_trials
from tests.helpers import (
    PAPER_CONFIG,
    REPO,
    free_port,
    paper_toy_overrides,
    start_ray_head,
    stop_ray_head,
    write_sciknoweval_layout,
)

RAY = str(Path(sys.executable).with_name("ray"))

pytestmark = [pytest.mark.e2e, pytest.mark.ray]  # a `ray start --head` of its own, `ray job submit`


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head started like a cluster's (`ray start --head`), loopback only, token auth on.

    Yields (dashboard address, environment with the token). Its own temp dir, so no other `ray.init()` on
    this machine finds it through /tmp/ray/ray_current_cluster.
    """
    temp_dir = Path("/tmp") / f"dcv-ray-{uuid.uuid4().hex[:8]}"  # Ray's socket paths must stay short
    token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",  # the job's `python` is this venv's
    )
    dashboard_port = free_port()
    start_ray_head(temp_dir, env, num_cpus=4, gcs_port=free_port(), dashboard_port=dashboard_port)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        wait_for_job_agent(address, env)
        yield address, env
    finally:
        stop_ray_head(temp_dir)


def wait_for_job_agent(address: str, env: dict[str, str], timeout_s: float = 180) -> None:
    """Until the head's job agent has registered, a submission fails with "No available agent"."""
    deadline = time.monotonic() + timeout_s
    while True:
        probe = subprocess.run(
            [RAY, "job", "submit", "--address", address, "--", "python", "-c", "pass"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if probe.returncode == 0:
            return
        assert "No available agent" in probe.stderr, probe.stderr[-3000:]
        assert time.monotonic() < deadline, "the Ray head's job agent never came up"
        time.sleep(1)


def test_job_submission_without_the_token_is_refused(ray_head):
    address, env = ray_head
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    listed = subprocess.run(
        [RAY, "job", "list", "--address", address], env=no_token, capture_output=True, text=True, timeout=120
    )
    assert listed.returncode != 0
    assert "auth" in (listed.stdout + listed.stderr).lower()


def paper_toy_config(tmp_path: Path) -> tuple[dict, Path]:
    """configs/qwen2.5-3b.yaml at toy size (tests/helpers.py ``paper_toy_overrides``: the paper's protocol,
    the tiny model) written to a file, as a user would submit it: the raw config and the file."""
    source = write_sciknoweval_layout(tmp_path / "sciknoweval")
    storage = (tmp_path / "store").resolve()
    raw = apply_overrides(yaml.safe_load(PAPER_CONFIG.read_text()), paper_toy_overrides(source, storage))
    config_file = tmp_path / "paper-toy.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    return raw, config_file


def submit(address: str, env: dict[str, str], config_file: Path) -> str:
    submitted = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--"]
        + ["python", "ray_jobs/experiment.py", "--config", str(config_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output[-4000:]
    assert "succeeded" in output.lower()
    return output


def test_experiment_submitted_as_a_ray_job(ray_head, tmp_path, capsys):
    """The paper config at toy size (rl.init sft, Dr. GRPO, exact + attribution + masks + cmap, the chem
    probe, benchmarks, calibration, weight change, FSDP) through `ray job submit`: every stage's table;
    `dcv report` rebuilds the report from the stored tables. (That a rerun trains and patches nothing
    again is the fault chain's, tests/faults/test_killed_run.py: one submission here.)"""
    address, env = ray_head
    raw, config_file = paper_toy_config(tmp_path)
    storage = Path(raw["storage"]["root"])
    output = submit(address, env, config_file)
    for stage in STAGES:
        assert f"{stage}] done in" in output
    assert "mlflow ui --backend-store-uri sqlite:///" in output

    checkpoints = read_results(storage)
    assert set(checkpoints["method"]) == {"sft", "rl"}
    assert json.loads(next((storage / "trials").rglob("config.json")).read_text())["model_type"] == "qwen2"
    effects = pl.read_parquet(patching_dir(storage) / "effects.parquet")
    assert set(effects["method"]) == {"exact", "attribution", "mask"}
    assert "chem" in set(effects["probe"]) and effects["effect"].is_finite().all()
    cmap = pl.read_parquet(patching_dir(storage) / "cmap.parquet")  # cross-model patching, checkpoints only
    assert set(cmap["direction"]) == {"ckpt_into_base", "base_into_ckpt"} and "base" not in set(cmap["model"])
    assert cmap["effect"].is_finite().all()
    assert not pl.read_parquet(analysis_dir(storage) / "cmap.parquet").is_empty()
    circuits = pl.read_parquet(circuits_dir(storage) / "circuits.parquet")
    assert "mask" in set(circuits["method"])
    curves = pl.read_parquet(circuits_dir(storage) / "faithfulness_curves.parquet")  # ranking methods only
    assert set(curves["method"]) == {"exact", "attribution"} and curves["faithfulness"].is_finite().all()
    assert not pl.read_parquet(analysis_dir(storage) / "faithfulness_areas.parquet").is_empty()
    assert any(calibration_dir(storage).rglob("*.parquet"))
    changed = pl.read_parquet(weight_change_dir(storage) / WEIGHT_CHANGE_FILE)
    assert changed.height == 2 * 8 * checkpoints.filter(pl.col("step") > 0).height  # layers x heads each

    report = storage / "report"
    text = (report / "report.md").read_text()
    assert "## The answer: SFT vs RL" in text
    # One run per method: no level can be matched, so no verdict and no DCV heatmap.
    assert "Insufficient runs" in text.split("## ")[1] and "higher under SFT" not in text
    page = (report / "report.html").read_text()
    figures = sorted(p.name for p in (report / "figures").glob("*.png"))
    assert {"adaptation.png", "forgetting.png", "pareto.png", "preservation.png"} <= set(figures)
    assert not any(name.startswith("dcv_") for name in figures)
    assert page.count("data:image/png;base64,") == len(figures)
    assert sorted(checkpoints["trial"].unique()) == sorted(s.name for s in plan_trials(parse_config(raw)))
    summary = pl.read_parquet(storage / "analysis" / "summary.parquet")
    # One row per evaluated checkpoint and patching method.
    assert summary.height == checkpoints.height * summary["patching"].n_unique()
    # lm-eval scored every model once; each checkpoint's row carries its model's score.
    assert checkpoints["bench/dcv_winogrande/acc"].is_between(0, 1).all()
    assert summary["forgetting_bench"].is_not_null().all()
    scored = list((storage / "benchmarks" / "models").glob("*.parquet"))
    assert len(scored) == 1 + 1 + 1  # base + step 2 of each trial
    noise_floor = pl.read_parquet(storage / "analysis" / "noise_floor.parquet")
    base = pl.read_parquet(storage / "analysis" / "base_circuits.parquet")
    # The ranking methods' floor: one bootstrap row per method and probe the base model does with a base
    # circuit (a random tiny model may do none); the masks' floor (relearned masks) comes from the circuits
    # stage.
    pairs = ("probe", "method")
    computed = noise_floor.filter(pl.col("method") != "mask")
    does = base.filter((pl.col("method") != "mask") & pl.col("competent") & (pl.col("size") > 0))
    assert sorted(computed.select(pairs).rows()) == sorted(does.select(pairs).rows())
    assert noise_floor.filter(pl.col("method") == "mask").height > 0
    assert noise_floor["jaccard"].is_between(0, 1).all()

    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(raw["tracking"]["experiment_name"])
    runs = client.search_runs([experiment.experiment_id])
    stages = sorted(r.data.tags.get("dcv.stage", "parent") for r in runs)
    assert stages == ["parent", "patch", "train", "train", "weight_change"]
    trained = [r for r in runs if r.data.tags.get("dcv.stage") == "train"]
    assert all("bench/dcv_winogrande/acc" in r.data.metrics for r in trained)
    parent = next(r for r in runs if "dcv.stage" not in r.data.tags)
    # The parent run ends FINISHED with the report's answer and the primary endpoint's verdict (one run per
    # method here: not compared, so no primary metrics and no answer table); no metric per headline cell.
    assert parent.info.status == "FINISHED" and parent.data.tags["dcv.answer"]
    assert parent.data.tags["dcv.verdict"] == "not compared (insufficient runs)"
    assert not any(k.startswith(("headline/", "primary/")) for k in parent.data.metrics)
    logged = [a.path for a in client.list_artifacts(parent.info.run_id, "report")]
    assert "report/report.html" in logged and "report/report.md" in logged

    # `dcv report` rebuilds the analysis and the report from the stored tables: no model is loaded,
    # nothing is trained, patched or searched again, and the same tables come out.
    analysis = {p: pl.read_parquet(p) for p in (storage / "analysis").glob("*.parquet")}
    circuit_files = {p: p.stat().st_mtime_ns for p in (storage / "circuits").rglob("*.parquet")}
    items = {p: p.stat().st_mtime_ns for p in (storage / "patching" / "items").glob("*.parquet")}
    (report / "report.md").unlink()
    assert main(["report", str(storage)]) == 0
    assert (report / "report.md").is_file() and "Insufficient runs" in capsys.readouterr().out
    assert all(pl.read_parquet(p).equals(table) for p, table in analysis.items())
    assert {p: p.stat().st_mtime_ns for p in circuit_files} == circuit_files
    assert {p: p.stat().st_mtime_ns for p in items} == items
