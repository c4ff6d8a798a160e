"""Placement of a sweep's trials: each RL trial reserves its rollout actors with its Tune driver, and the
sweep runs only as many trials as fit together (in sweep.cluster_resources, or the cluster).

The Ray test runs the real Tuner (`build_tuner`: `trial_placement`, `concurrent_trials`) on a local Ray
that declares 8 GPUs it does not have (``num_gpus=8``: logical resources; no CUDA call is made). Its
trainable is a cheap stand-in for `train_trial`: a real Ray Train `TorchTrainer` with the trial's
`learner_scaling` (4 learners x 1 GPU; gloo, because NCCL would need the GPUs) whose rank 0 starts the
trial's 2 rollout actors with `rollout_actor_options` (1 GPU each) into the Tune trial's placement group,
as `RolloutPool` does. A real GRPO trial would also load models and, with ``use_gpu``, ask HF and Ray
Train for CUDA (``checkpoints.shared_trainer_args``: nccl, ``use_cpu`` False); the stand-in keeps the
placement code and leaves those out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import ray

from dcv.config import ConfigError, parse_config
from dcv.training.rollout import rollout_bundles
from dcv.training.sweep import TrialSpec, concurrent_trials, plan_trials, trial_placement, trial_spec
from tests.helpers import sweep_config_dict

REPO = Path(__file__).resolve().parents[2]


@ray.remote
class Probe:
    """Stands in for RolloutActor (no model): reports the placement group and GPUs Ray gave it."""

    def where(self) -> dict:
        return {
            "placement": ray.get_runtime_context().get_placement_group_id(),
            "gpus": [str(g) for g in ray.get_gpu_ids()],
        }


def gpu_sweep_dict(storage: Path, **sweep) -> dict:
    """Two RL trials (one rate, two seeds) of 4 learners + 2 rollout actors, one GPU each: 6 GPUs."""
    raw = sweep_config_dict(storage, methods=["rl"], rl_learning_rates=[1e-6], seeds=[0, 1], **sweep)
    raw["resources"].update(num_workers=4, use_gpu=True, cpus_per_worker=0.1, gpus_per_worker=1)
    raw["rl"]["rollout"] = {"backend": "hf", "num_actors": 2, "num_cpus": 0.1, "num_gpus": 1}
    return raw


def test_an_rl_trial_reserves_its_rollout_actors_with_its_driver(tmp_path):
    cfg = parse_config(gpu_sweep_dict(tmp_path))
    specs = plan_trials(cfg)
    config = {"config": cfg.model_dump(mode="json"), "spec": asdict(specs[0])}
    assert trial_spec(config) == specs[0]
    factory = trial_placement(config)
    assert factory.bundles == [{"CPU": 0.01}, {"CPU": 0.1, "GPU": 1}, {"CPU": 0.1, "GPU": 1}]
    assert factory.strategy == "PACK"
    sft = TrialSpec("sft-x", "sft", 1e-5, 0, ())
    assert trial_placement({**config, "spec": asdict(sft)}).bundles == [{"CPU": 0.01}]
    assert rollout_bundles(cfg) == factory.bundles[1:]


def test_concurrency_comes_from_the_declared_cluster_and_never_from_a_guess(tmp_path):
    cfg = parse_config(gpu_sweep_dict(tmp_path, max_concurrent_trials=4))
    specs = plan_trials(cfg)
    # 6 GPUs a trial: one fits 8, two fit 12.
    assert concurrent_trials(cfg, specs, {"CPU": 8.0, "GPU": 8.0}) == 1
    assert concurrent_trials(cfg, specs, {"CPU": 8.0, "GPU": 12.0}) == 2
    # An autoscaling cluster at its head node has no GPU yet: refused, not run at max_concurrent_trials.
    with pytest.raises(
        ValueError, match=r"sweep.cluster_resources: the largest trial needs .*6 GPU \(has 0\)"
    ):
        concurrent_trials(cfg, specs, {"CPU": 8.0})
    # Declared, what the cluster can reach wins over what it has now.
    raw = gpu_sweep_dict(tmp_path, max_concurrent_trials=4, cluster_resources={"CPU": 96, "GPU": 16})
    cfg = parse_config(raw)
    assert concurrent_trials(cfg, plan_trials(cfg), {"CPU": 8.0}) == 2
    raw["sweep"]["cluster_resources"] = {"CPU": 96, "GPU": 4}
    with pytest.raises(
        ConfigError, match=r"sweep.cluster_resources: one rl trial needs 6 GPU \(declared 4\)"
    ):
        parse_config(raw)


# --- the Ray test: two 6-GPU RL trials on 8 declared GPUs --------------------------------------------------


def _learner_loop(loop_config: dict) -> None:
    """Ray Train worker: rank 0 starts the trial's rollout actors as RolloutPool does; every rank's GPU
    ids and the actors' (placement group, GPU ids) are reported by rank 0."""
    import ray.train
    import torch.distributed as dist

    from dcv.training.rollout import rollout_actor_options

    cfg = parse_config(loop_config["config"])
    rank = ray.train.get_context().get_world_rank()
    ids = [None] * ray.train.get_context().get_world_size()
    dist.all_gather_object(ids, [str(g) for g in ray.get_gpu_ids()])
    metrics = {"learner_gpus": json.dumps(ids)}
    if rank == 0:
        actors = [
            Probe.options(
                **rollout_actor_options(cfg, loop_config["trial"], i, loop_config["placement"])
            ).remote()
            for i in range(cfg.rl.rollout.num_actors)
        ]
        metrics["actors"] = json.dumps(ray.get([a.where.remote() for a in actors]))
        time.sleep(1.0)  # the trial holds its GPUs a moment: an overlapping trial would be seen
        for actor in actors:
            ray.kill(actor)
        # To a file, not ray.train.report: Ray Train v2's Result.metrics holds only metrics reported with
        # a checkpoint (None here), which made this test fail on its first run (2026-12-07).
        Path(loop_config["seen"]).write_text(json.dumps(metrics))


def _cheap_rl_trial(tune_config: dict) -> None:
    """The Tune trainable standing in for train_trial: same placement group, learners and actor options."""
    from ray import tune
    from ray.train import RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.placement_group import get_current_placement_group

    from dcv.config import config_to_dict
    from dcv.training.sweep import trial_spec
    from dcv.training.trial import learner_scaling, trials_root

    cfg = parse_config(tune_config["config"])
    spec = trial_spec(tune_config)
    trial_cfg = spec.config(cfg)
    start = time.time()
    placement = get_current_placement_group()
    seen = trials_root(trial_cfg) / f"{spec.name}.seen.json"
    trainer = TorchTrainer(
        _learner_loop,
        train_loop_config={
            "config": config_to_dict(trial_cfg),
            "trial": spec.name,
            "placement": placement,
            "seen": str(seen),
        },
        scaling_config=learner_scaling(trial_cfg),
        torch_config=TorchConfig(backend="gloo"),  # logical GPUs: NCCL would need real ones
        run_config=RunConfig(name=spec.name, storage_path=str(trials_root(trial_cfg))),
    )
    trainer.fit()
    tune.report(
        {**json.loads(seen.read_text()), "start": start, "end": time.time(), "placement": placement.id.hex()}
    )


def run_two_rl_trials(storage: str) -> None:
    """In its own process (the test session's Ray declares no GPUs): Ray with 8 logical GPUs, then the
    sweep's Tuner over two 6-GPU RL trials; prints one JSON line per trial."""
    from dcv.training.sweep import build_tuner
    from dcv.training.trial import runtime_env_vars

    cfg = parse_config(gpu_sweep_dict(Path(storage), max_concurrent_trials=2))
    specs = plan_trials(cfg)
    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=8,  # declared, not detected: this machine has none, and nothing here calls CUDA
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        runtime_env={"env_vars": runtime_env_vars(dict(os.environ))},
    )
    try:
        results = build_tuner(cfg, specs, trainable=_cheap_rl_trial).fit()
        keys = ("start", "end", "placement", "learner_gpus", "actors")
        for r in results:
            row = {"name": r.config["spec"]["name"], "error": str(r.error or "")}
            print("TRIAL " + json.dumps({**row, **{k: r.metrics.get(k) for k in keys}}))
    finally:
        ray.shutdown()


@pytest.mark.ray
def test_two_six_gpu_rl_trials_run_one_after_the_other_on_eight_declared_gpus(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600",  # 4 worker processes start slowly on a shared CPU
    }
    code = (
        f"from tests.training.test_placement import run_two_rl_trials; run_two_rl_trials({str(tmp_path)!r})"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]
    trials = [json.loads(line[6:]) for line in done.stdout.splitlines() if line.startswith("TRIAL ")]
    assert sorted(t["name"] for t in trials) == ["rl-lr1e-06-seed0", "rl-lr1e-06-seed1"]
    assert all(t["error"] == "" for t in trials), [t["error"] for t in trials]
    first, second = sorted(trials, key=lambda t: t["start"])
    assert first["end"] <= second["start"]  # one after the other: never both holding GPUs
    for trial in trials:
        learners = [gpu for ids in json.loads(trial["learner_gpus"]) for gpu in ids]
        actors = json.loads(trial["actors"])
        # Both actors ran in the trial's Tune placement group (its only GPU bundles are theirs).
        assert [a["placement"] for a in actors] == [trial["placement"]] * 2
        gpus = learners + [gpu for a in actors for gpu in a["gpus"]]
        assert len(gpus) == 6 and len(set(gpus)) == 6  # 4 learners + 2 actors, no GPU shared
