"""Ray Tune sweeps of tiny-model trials: the plan, the results table, MLflow, and resuming a killed driver."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from dcv import tracking
from dcv.config import ConfigError, parse_config
from dcv.results import KEY_COLUMNS, read_results
from dcv.storage import checkpoint_model, storage_root
from dcv.training.sweep import check_plan, concurrent_trials, plan_trials, run_sweep, sweep_phases
from dcv.training.trial import start_point, trials_root
from tests.helpers import sweep_config_dict


def train_child_runs(cfg) -> list:
    client = MlflowClient(tracking.resolve_tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.tracking.experiment_name)
    return client.search_runs([experiment.experiment_id], filter_string="tags.`dcv.stage` = 'train'")


def test_plan_expands_methods_rates_seeds_and_grid(tmp_path):
    cfg = parse_config(sweep_config_dict(tmp_path, grid={"sft.max_steps": [2, 3], "evaluation.kl_seed": [0]}))
    specs = plan_trials(cfg)
    # sft: 2 lrs x 2 max_steps x 2 seeds; rl: 2 lrs x 2 seeds (an sft.* key does not vary RL trials).
    assert len(specs) == 8 + 4
    assert len({s.name for s in specs}) == len(specs)
    assert "sft-lr3e-05-seed1-max_steps3-kl_seed0" in {s.name for s in specs}
    rl = [s for s in specs if s.method == "rl"]
    assert all(dict(s.overrides) == {"evaluation.kl_seed": 0} for s in rl)
    assert {s.learning_rate for s in rl} == {1e-6, 3e-6}
    trial_cfg = specs[0].config(cfg)
    assert trial_cfg.sft.learning_rate == specs[0].learning_rate and trial_cfg.sft.max_steps == 2


def test_a_grid_value_that_breaks_the_config_is_refused_before_compute(tmp_path):
    cfg = parse_config(sweep_config_dict(tmp_path, grid={"sft.max_steps": [2, -1]}))
    with pytest.raises(ValueError, match=r"sweep trial sft-lr1e-05-seed0-max_steps-1.*sft.max_steps"):
        check_plan(cfg, plan_trials(cfg))
    assert not trials_root(cfg).exists()


def test_rl_after_sft_plan_and_errors(tmp_path):
    raw = sweep_config_dict(tmp_path, rl_learning_rates=[1e-6])
    raw["rl"]["init"] = "sft"
    # Two SFT rates: the start must be chosen (a ConfigError names the field), never the first by default.
    with pytest.raises(ConfigError, match="rl.init_sft_learning_rate: rl.init=sft and sweep.sft_learning"):
        parse_config(raw)
    raw["rl"]["init_sft_learning_rate"] = 3e-5  # the second rate
    cfg = parse_config(raw)
    specs = plan_trials(cfg)
    rl = [s for s in specs if s.method == "rl"]
    # Each RL trial starts from the sweep's SFT trial of its seed at the chosen rate, and waits for it.
    assert [s.name for s in rl] == ["rl-lr1e-06-seed0-after-sft", "rl-lr1e-06-seed1-after-sft"]
    assert [dict(s.overrides)["rl.init_trial"] for s in rl] == ["sft-lr3e-05-seed0", "sft-lr3e-05-seed1"]
    phases = sweep_phases(cfg, specs)
    assert [[s.method for s in phase] for phase in phases] == [["sft"] * 4, ["rl"] * 2]
    only_rl = parse_config({**raw, "sweep": {**raw["sweep"], "methods": ["rl"]}})
    with pytest.raises(
        ValueError, match="rl.init_trial: rl.init=sft, but the sweep has no SFT trial of seed 0"
    ):
        plan_trials(only_rl)
    with pytest.raises(ValueError, match="rl.init_trial: SFT trial 'sft-lr3e-05-seed0' has not finished"):
        start_point(rl[0].config(cfg), "rl", 0)
    with pytest.raises(ConfigError, match="rl.init_step: only meaningful with rl.init=sft"):
        parse_config({**raw, "rl": {**raw["rl"], "init": "base", "init_step": 2}})


def test_sweep_chains_rl_after_sft(ray_cluster, tmp_path):
    """SFT, then GRPO from SFT's last checkpoint (the seed paper's protocol), in one sweep."""
    raw = sweep_config_dict(
        tmp_path / "store", sft_learning_rates=[1e-5], rl_learning_rates=[1e-6], seeds=[0]
    )
    raw["rl"]["init"] = "sft"
    raw["sft"]["eval_every"] = raw["rl"]["eval_every"] = 2  # checkpoints at steps 0 and 2 only
    cfg = parse_config(raw)
    table = run_sweep(cfg)
    specs = plan_trials(cfg)
    assert [s.name for s in specs] == ["sft-lr1e-05-seed0", "rl-lr1e-06-seed0-after-sft"]
    expected = {(s.name, step) for s in specs for step in (0, 2)}
    assert set(zip(table["trial"], table["step"], strict=True)) == expected and table.height == len(expected)
    assert read_results(storage_root(cfg)).equals(table)
    assert list(table.columns[: len(KEY_COLUMNS)]) == list(KEY_COLUMNS)
    sft, rl = (table.filter(pl.col("method") == m).sort("step") for m in ("sft", "rl"))
    assert (sft["init"] == "base").all() and (rl["init"] == "sft:sft-lr1e-05-seed0@2").all()
    assert sft["kl_to_base"][0] == pytest.approx(0.0, abs=1e-6) and sft["kl_to_base"][1] > 0  # SFT moved
    # RL's step 0 is SFT's last checkpoint: the same weights, so the same scores.
    start, last_sft = (
        load_file(Path(p) / "model.safetensors") for p in (rl["checkpoint"][0], sft["checkpoint"][1])
    )
    assert start.keys() == last_sft.keys() and all(torch.equal(start[k], last_sft[k]) for k in start)
    assert rl["kl_to_base"][0] == pytest.approx(sft["kl_to_base"][1], rel=1e-5)
    assert rl["target/accuracy"][0] == sft["target/accuracy"][1]
    assert rl.filter(pl.col("step") > 0)["train/reward"].is_not_null().all()
    assert checkpoint_model("rl-lr1e-06-seed0-after-sft", 0, rl["init"][0]) == "sft-lr1e-05-seed0@2"

    runs = train_child_runs(cfg)
    assert sorted(r.data.tags["dcv.run_key"] for r in runs) == sorted(s.name for s in specs)
    parent_ids = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert len(parent_ids) == 1 and all(run.info.status == "FINISHED" for run in runs)
    rl_run = next(r for r in runs if r.data.tags["dcv.method"] == "rl")
    assert rl_run.data.params["trial.init"] == "sft:sft-lr1e-05-seed0@2"
    client = MlflowClient(tracking.resolve_tracking_uri(cfg))
    artifacts = {a.path for a in client.list_artifacts(parent_ids.pop(), "results")}
    assert artifacts == {"results/checkpoints.parquet", "results/checkpoints.csv"}

    # A second run of the finished sweep trains nothing and duplicates no MLflow run.
    stamps = {p: p.stat().st_mtime_ns for p in trials_root(cfg).rglob("checkpoint_*/*")}
    again = run_sweep(cfg)
    assert again.equals(table)
    assert {p: p.stat().st_mtime_ns for p in trials_root(cfg).rglob("checkpoint_*/*")} == stamps
    assert len(train_child_runs(cfg)) == len(specs)


def test_concurrency_is_lowered_to_what_the_cluster_fits(tmp_path):
    cfg = parse_config(sweep_config_dict(tmp_path, max_concurrent_trials=3))
    specs = plan_trials(cfg)
    # An RL trial holds its driver (0.01 CPU), a learner CPU and a rollout-actor CPU: two of them
    # deadlock on 2.5 CPUs, each learner waiting for a rollout actor's CPU.
    assert concurrent_trials(cfg, specs, {"CPU": 2.5}) == 1
    assert concurrent_trials(cfg, specs, {"CPU": 5.0}) == 2  # 2.01 CPUs each
    assert concurrent_trials(cfg, specs, {"CPU": 64.0}) == 3
    sft_only = [s for s in specs if s.method == "sft"]
    assert concurrent_trials(cfg, sft_only, {"CPU": 2.5}) == 2
    # Room for no trial at all: refused (sweep.cluster_resources declares what an autoscaler can reach).
    with pytest.raises(ValueError, match="sweep.cluster_resources: the largest trial needs 2.01 CPU"):
        concurrent_trials(cfg, specs, {"CPU": 1.0})
