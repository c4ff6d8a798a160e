"""A sweep's plan: the trials a config expands to, RL after SFT, and how many run at once on a cluster. (A
whole sweep runs in the fault chain, tests/faults, and in the paper config's job, tests/test_two_nodes.py.)"""

from __future__ import annotations

import pytest

from dcv.config import ConfigError, parse_config
from dcv.training.sweep import check_plan, concurrent_trials, plan_trials, sweep_phases
from dcv.training.trial import start_point, trials_root
from tests.helpers import sweep_config_dict


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
