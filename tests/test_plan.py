"""`dcv plan` (dcv.plan): the work and cost of every stage from the config alone, before anything runs."""

from __future__ import annotations

import re

import pytest
import yaml

from dcv.circuits.methods import METHODS
from dcv.cli import main
from dcv.config import PROBE_NAMES, load_config, parse_config
from dcv.experiment import STAGES  # the stages dcv run has: the plan prices each
from dcv.plan import (
    CPU_CORE,
    H100,
    PATCHED_TOKENS,
    PROBE_TOKENS,
    Cluster,
    Costs,
    build_plan,
    model_shape,
    n_models,
    patching_seconds,
    plan_summary,
    plan_trials,
    trial_devices,
)
from tests.helpers import REPO, tiny_config_dict

DEMO = REPO / "configs" / "demo.yaml"
PAPER = REPO / "configs" / "qwen2.5-3b.yaml"
TWO_CORES = Cluster(0.0, 2.0, "2 cores")
EIGHT_H100 = Cluster(8.0, 128.0, "8 GPUs")


def test_the_demo_and_paper_plans_price_every_stage_of_dcv_run():
    demo = build_plan(load_config(DEMO), TWO_CORES, "demo")
    assert [s.stage for s in demo.stages] == list(STAGES)
    assert demo.device is CPU_CORE and demo.shape.layers * demo.shape.heads == 270
    # The demo's own counts: 2 SFT + 2 GRPO trials evaluated at 0, 4, 8 -> the base + 8 checkpoints.
    assert n_models(plan_trials(load_config(DEMO))) == 9
    for name in ("sweep", "patching", "circuits", "calibration"):
        assert demo.stage(name).device_s > 0 and demo.stage(name).wall_s > 0, name
    assert demo.stage("benchmarks").wall_s == 0  # none configured
    paper = build_plan(load_config(PAPER), EIGHT_H100, "paper")
    assert paper.device is H100 and paper.shape.params == pytest.approx(3.09e9)
    # 9 SFT trials with 10 evaluated steps after 0, 9 GRPO trials from their SFT's last checkpoint.
    assert n_models(plan_trials(load_config(PAPER))) == 1 + 9 * 10 + 9 * 10
    assert paper.stage("sweep").work.endswith("1 at a time")  # a 6-GPU RL trial: one fits 8 GPUs
    # The whole cluster is billed over the wall time; the stages hold less of it (idle GPUs).
    assert paper.cluster_hours > paper.device_hours > 0


def test_doubling_the_seeds_doubles_the_sweep_work():
    raw = yaml.safe_load(DEMO.read_text())
    one = build_plan(parse_config(raw), TWO_CORES).stage("sweep")
    raw["sweep"]["seeds"] = [0, 1, 2, 3]
    two = build_plan(parse_config(raw), TWO_CORES).stage("sweep")
    assert two.device_s == pytest.approx(2 * one.device_s)
    assert two.wall_s == pytest.approx(2 * one.wall_s)  # the same 2 slots, twice the trials each


def test_external_runs_are_priced_as_scored_checkpoints_not_as_trained_trials(tmp_path):
    """With external runs the sweep stage scores the listed checkpoints (dcv.external): no trial, no
    learner; the circuit stages see the base and every listed checkpoint after step 0."""
    raw = tiny_config_dict(tmp_path / "store")
    folders = {f"{run}-{step}": str(tmp_path) for run in ("sft", "rl") for step in (0, 2, 4)}
    raw["external"] = {
        "runs": [
            {
                "run": run,
                "method": run,
                "checkpoints": [{"step": s, "path": folders[f"{run}-{s}"]} for s in (2, 4)],
            }
            for run in ("sft", "rl")
        ]
    }
    external = build_plan(parse_config(raw), TWO_CORES)
    trained = build_plan(parse_config(tiny_config_dict(tmp_path / "store")), TWO_CORES)
    sweep = external.stage("sweep")
    assert sweep.work == "external runs: 5 models scored, none trained"
    assert 0 < sweep.device_s < trained.stage("sweep").device_s
    assert external.stage("patching").work.startswith("5 models x ")


def test_adding_a_probe_adds_its_patching_work():
    raw = yaml.safe_load(DEMO.read_text())
    before = build_plan(parse_config(raw), TWO_CORES)
    raw["probes"].append({"name": "chem", "n_items": 16, "seed": 0})
    raw["target_task"]["answer_format"] = "letter"  # the chem probe compares answer letters
    cfg = parse_config(raw)
    after = build_plan(cfg, TWO_CORES)
    added = patching_seconds(
        Costs(cfg, model_shape(cfg), CPU_CORE, TWO_CORES), 9, [cfg.probe("chem")], ["attribution"]
    )
    assert added > 0
    # One core per actor, 2 actors: the probe's compute once in device time, half of it in wall time.
    assert after.stage("patching").device_s - before.stage("patching").device_s == pytest.approx(added)
    assert after.stage("patching").wall_s - before.stage("patching").wall_s == pytest.approx(added / 2)
    assert after.stage("circuits").device_s > before.stage("circuits").device_s


def test_every_probe_and_every_registered_method_is_priced():
    """A probe or method the plan cannot price would stop `dcv plan` and `dcv run` with a KeyError
    (docs/development.md, the probe and method recipes)."""
    assert set(PROBE_TOKENS) == set(PATCHED_TOKENS) == set(PROBE_NAMES)
    cfg = load_config(DEMO)
    costs = Costs(cfg, model_shape(cfg), CPU_CORE, TWO_CORES)
    for method in METHODS:
        assert patching_seconds(costs, 9, list(cfg.probes), [method]) > 0, method


def test_an_rl_trial_holds_its_rollout_actors_gpus_with_its_learners():
    trials = plan_trials(load_config(PAPER))
    rl = next(t for t in trials if t.method == "rl")
    sft = next(t for t in trials if t.method == "sft")
    assert trial_devices(sft, cluster_gpu=True) == 4
    assert trial_devices(rl, cluster_gpu=True) == 4 + 2  # 4 learners + 2 vLLM actors of 1 GPU
    shared = load_config(PAPER, ["rl.rollout.num_gpus=0.5"])
    assert trial_devices(next(t for t in plan_trials(shared) if t.method == "rl"), cluster_gpu=True) == 5
    # With 12 GPUs two RL trials fit at once: the sweep's wall time falls, its GPU-hours do not.
    eight = build_plan(load_config(PAPER), EIGHT_H100).stage("sweep")
    twelve = build_plan(load_config(PAPER), Cluster(12.0, 128.0, "12 GPUs")).stage("sweep")
    assert twelve.wall_s < eight.wall_s and twelve.device_s == pytest.approx(eight.device_s)


def test_a_hub_model_of_unknown_size_is_an_error_naming_the_field(tmp_path):
    raw = yaml.safe_load(DEMO.read_text())
    raw["model"]["name"] = "someone/unknown-7b"
    cfg = parse_config(raw)
    with pytest.raises(ValueError, match=r"model\.name='someone/unknown-7b'"):
        build_plan(cfg, TWO_CORES)
    assert plan_summary(cfg).startswith("plan: not available (model.name=")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 64, "num_hidden_layers": 2}')
    raw["model"]["name"] = str(folder)
    with pytest.raises(
        ValueError, match=r"config\.json has no num_attention_heads, intermediate_size, vocab_size"
    ):
        build_plan(parse_config(raw), TWO_CORES)


def test_dcv_plan_prints_a_row_per_stage_and_the_total(capsys):
    assert main(["plan", str(PAPER), "--gpus", "8", "--cpus", "128"]) == 0
    out = capsys.readouterr().out
    for stage in STAGES:
        assert re.search(rf"^{stage} +(\d+ +)?\d+\.\d\d +\S+", out, re.MULTILINE), stage
    assert re.search(r"^sweep +6 +\d+\.\d\d ", out, re.MULTILINE)  # one RL trial of 6 GPUs at a time
    assert re.search(
        r"^plan: [\d.]+ GPU-hours held by the stages, [\d.]+ h wall .* on 8 GPUs", out, re.MULTILINE
    )


def test_dcv_plan_refuses_what_dcv_validate_refuses(tiny_config_file, capsys):
    bad = ["--set", "circuits.tau=3", "--set", "sweep.seeds=[0, 0]"]
    assert main(["validate", str(tiny_config_file), *bad]) == 2
    validate = capsys.readouterr().err
    assert main(["plan", str(tiny_config_file), *bad]) == 2
    plan = capsys.readouterr().err
    assert "circuits.tau" in validate and "sweep.seeds" in validate
    assert plan.replace("dcv plan:", "dcv validate:") == validate
    assert main(["plan", str(tiny_config_file), "--gpus", "-1"]) == 2
    assert "--gpus -1" in capsys.readouterr().err


def test_dcv_run_prints_the_plan_before_it_connects(tmp_path):
    """run_experiment's first line is the plan's total, after the checks and before Ray starts; the plan
    prices the stages dcv run has."""
    from dcv.experiment import run_experiment

    lines: list[str] = []

    def connect() -> None:
        raise RuntimeError("stop before Ray")

    with pytest.raises(RuntimeError, match="stop before Ray"):
        run_experiment(
            parse_config(tiny_config_dict(tmp_path / "storage")), lines.append, lines.append, connect
        )
    assert len(lines) == 1 and re.match(r"plan: [\d.]+ core-hours held by the stages, ", lines[0]), lines


def test_plan_trials_counts_the_trials_the_sweep_runs():
    """dcv.plan prices the trials the sweep runs (dcv.trials, without Ray): each with its own config, RL
    after SFT in the second phase."""
    from dcv.trials import plan_trials as sweep_trials

    raw = yaml.safe_load(PAPER.read_text())
    # A grid key of RL only and one of both methods: each RL trial has exactly one SFT trial to start from.
    raw["sweep"]["grid"] = {"rl.max_steps": [100, 200], "circuits.tau": [0.7, 0.8]}
    cfg = parse_config(raw)
    ours, theirs = plan_trials(cfg), sweep_trials(cfg)

    def key(method: str, trial_cfg) -> tuple:
        return (
            method,
            getattr(trial_cfg, method).learning_rate,
            trial_cfg.rl.max_steps,
            trial_cfg.circuits.tau,
        )

    assert [key(t.method, t.cfg) for t in ours] == [key(s.method, s.config(cfg)) for s in theirs]
    assert [t.after_sft for t in ours] == [s.name.endswith("-after-sft") for s in theirs]
    seeds, sweep = len(cfg.sweep.seeds), cfg.sweep
    assert len(ours) == seeds * 2 * (len(sweep.sft_learning_rates) + 2 * len(sweep.rl_learning_rates))


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_the_tiny_models_size_is_its_parameter_count(architecture):
    """The plan sizes a model from its dims (model.tiny, or a folder's config.json) without loading it:
    within 0.1% of the parameters transformers builds (the plan leaves out norms and biases)."""
    from dcv.models import load_model_and_tokenizer

    raw = yaml.safe_load(DEMO.read_text())
    raw["model"] = {"name": "tiny", "tiny": {"architecture": architecture}}
    cfg = parse_config(raw)
    model, _ = load_model_and_tokenizer(cfg.model)
    assert model_shape(cfg).params == pytest.approx(sum(p.numel() for p in model.parameters()), rel=1e-3)
    assert (model_shape(cfg).layers, model_shape(cfg).heads) == (2, 4)
