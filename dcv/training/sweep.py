"""A sweep: Ray Tune runs many trials (method x learning rate x seed x grid), each one Ray Train run.

Run it with ``dcv sweep configs/demo.yaml`` (local Ray) or, on a cluster,
``ray job submit --working-dir . -- python -m ray_jobs.sweep --config configs/demo.yaml``.

The trial plan is explicit: ``plan_trials`` expands ``sweep.methods`` x the method's learning rates x
``sweep.seeds`` x ``sweep.grid`` (other config fields by dotted path; a ``sft.*`` or ``rl.*`` key varies
only that method's trials). Each Tune trial is a small driver function (a sliver of a CPU: Ray Train
V2's workers ask for their own) that builds and fits the trial's ``TorchTrainer`` through ``run_trial``,
with Tune's ``TuneReportCallback`` forwarding every evaluated checkpoint's metrics to Tune (and to ASHA).

Resuming: rerunning the same command with the same storage and ``sweep.name`` restores the Tune
experiment (``Tuner.restore``); finished trials are not rerun, unfinished ones resume from their latest
checkpoint (``run_trial``'s own resume), and each trial's MLflow child run is found again by its name.
A sweep folder started with another plan is refused. When Tune is done, the results table
(``dcv.results``) is written from the trial folders and logged to the sweep's MLflow parent run.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import polars as pl
import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.util.placement_group import get_current_placement_group

from dcv import tracking
from dcv.config import (
    TRIAL_DRIVER_CPU,
    ExperimentConfig,
    config_to_dict,
    parse_config,
    trial_resource_needs,
)
from dcv.results import build_results_table, write_results
from dcv.storage import StoragePath, atomic_path, ray_storage, read_json, set_aside, storage_root, sweeps_dir
from dcv.training.trial import (
    finished_trial,
    list_checkpoints,
    repair_trial,
    run_trial,
    trial_init,
    trials_root,
)
from dcv.trials import TrialSpec, plan_trials, sweep_phases

# The trial driver only waits on its TorchTrainer, whose workers ask for their own CPUs/GPUs. Tune refuses
# an empty request, so it takes a sliver of a CPU: trials never starve their own workers of a core.
TRIAL_DRIVER_RESOURCES = {"CPU": TRIAL_DRIVER_CPU}
PLAN_FILE = "dcv_plan.json"  # beside Tune's experiment state: the trials this sweep folder was started with


def check_plan(cfg: ExperimentConfig, specs: list[TrialSpec]) -> None:
    """Validate every trial's config before any compute; a sweep folder keeps the plan it started with."""
    for spec in specs:
        spec.config(cfg)  # raises ConfigError naming the trial and the field
    path = sweep_dir(cfg) / PLAN_FILE
    plan = [asdict(s) for s in specs]
    before = read_json(path)  # an unreadable plan is moved aside; run_sweep writes it again
    if before is not None:
        if before != json.loads(json.dumps(plan)):
            old, new = {p["name"] for p in before}, {p["name"] for p in plan}
            raise ValueError(
                f"sweep.name={cfg.sweep.name!r}: {path.parent} holds a sweep with other trials "
                f"(only before: {sorted(old - new)[:5]}, only now: {sorted(new - old)[:5]}); "
                "use another sweep.name or storage.root, or delete that folder to start over"
            )


def sweep_dir(cfg: ExperimentConfig) -> StoragePath:
    return sweeps_dir(storage_root(cfg)) / cfg.sweep.name


def repair_sweep(cfg: ExperimentConfig, specs: list[TrialSpec]) -> list[str]:
    """Move invalid finished trials aside (``repair_trial``) so that the sweep redoes them; their names.

    Tune's state has those trials as done and would not run them again, so it is moved aside too: a
    fresh Tuner runs the plan (finished trials only report their last checkpoint, unfinished ones resume
    from theirs). Running it again finds nothing to move."""
    repaired = [spec.name for spec in specs if repair_trial(spec.config(cfg), spec.name)]
    if repaired:
        for phase in range(len(sweep_phases(cfg, specs))):
            folder = tune_dir(cfg, phase)
            if folder.exists():
                set_aside(folder, f"Tune state of trials {repaired}, which were invalid and are redone")
    return repaired


def tune_dir(cfg: ExperimentConfig, phase: int) -> StoragePath:
    """Tune's experiment folder of a phase: ``sweeps/<sweep.name>``, ``sweeps/<sweep.name>-after-sft``."""
    name = cfg.sweep.name if phase == 0 else f"{cfg.sweep.name}-after-sft"
    return sweep_dir(cfg).parent / name


def train_trial(tune_config: dict[str, Any]) -> None:
    """The Tune trainable: one trial's driver. Finished trials only report their last checkpoint.

    It runs in bundle 0 of the trial's placement group (``trial_placement``); an RL trial's rollout
    actors are scheduled into the group's other bundles, reserved with it."""
    cfg = parse_config(tune_config["config"])
    spec = trial_spec(tune_config)
    trial_cfg = spec.config(cfg)
    done = finished_trial(trial_cfg, spec.name)
    if done is not None:
        tune.report({"step": float(done[-1].step), **done[-1].metrics})
        return
    placement = get_current_placement_group() if spec.method == "rl" else None
    run_trial(
        trial_cfg,
        spec.method,
        spec.seed,
        name=spec.name,
        callbacks=[TuneReportCallback()],
        rollout_placement=placement,
    )


def trial_spec(tune_config: dict[str, Any]) -> TrialSpec:
    """The TrialSpec a Tune trial's config carries."""
    raw = tune_config["spec"]
    return TrialSpec(**{**raw, "overrides": tuple(tuple(o) for o in raw["overrides"])})


def trial_placement(tune_config: dict[str, Any]) -> tune.PlacementGroupFactory:
    """A Tune trial's placement group: its driver (bundle 0) and, for RL, one bundle per rollout actor.

    Why: rollout actors created outside it (Ray's default scheduling) competed with other trials'
    learners; under an autoscaler, learners could take the GPUs their actors needed and wait in
    ``dist.barrier()`` until the NCCL timeout. Tune starts the trial only once the whole group is placed.
    The learners are Ray Train's own placement group (``dcv.training.trial.learner_scaling``), requested
    after; ``concurrent_trials`` runs only as many trials as all of theirs fit together."""
    # Imported here, on the driver: the rollout module loads transformers, and every Tune trial process
    # imports this module for train_trial (about 4 s of CPU per trial on 2 cores, 2026-12-07).
    from dcv.training.rollout import rollout_bundles

    spec = trial_spec(tune_config)
    bundles = [dict(TRIAL_DRIVER_RESOURCES)]
    if spec.method == "rl":
        bundles += rollout_bundles(spec.config(parse_config(tune_config["config"])))
    return tune.PlacementGroupFactory(bundles, strategy="PACK")


def trial_resources(cfg: ExperimentConfig, method: str) -> dict[str, float]:
    """What one trial holds while it runs: its Tune driver, its learners and, for RL, its rollout actors
    (`dcv.config.trial_resource_needs`, which the config's own check of sweep.cluster_resources uses)."""
    return trial_resource_needs(cfg, method)


def concurrent_trials(cfg: ExperimentConfig, specs: list[TrialSpec], cluster: dict[str, float]) -> int:
    """``sweep.max_concurrent_trials``, lowered so that that many of the largest trials fit together in
    ``sweep.cluster_resources`` when the config declares it, else in ``cluster``
    (``ray.cluster_resources()`` now).

    Why: a trial holds its driver and rollout actors (its Tune placement group) while Ray Train places
    its learners; trials whose learners could not all be placed at once would hold GPUs and wait for
    each other forever. Raises when not even one trial fits: under an autoscaler the cluster starts at
    its head node, and a guess (the old fallback to max_concurrent_trials) could be that deadlock.
    """
    declared = cfg.sweep.cluster_resources
    have = dict(declared) if declared is not None else cluster
    source = "sweep.cluster_resources" if declared is not None else "the Ray cluster now"
    largest: dict[str, float] = {}
    for spec in specs:
        for key, value in trial_resources(spec.config(cfg), spec.method).items():
            largest[key] = max(largest.get(key, 0.0), value)
    needed = largest
    fits = min((int(have.get(key, 0.0) // value) for key, value in needed.items()), default=None)
    if fits is None:
        return cfg.sweep.max_concurrent_trials
    if fits < 1:
        short = ", ".join(f"{v:g} {k} (has {have.get(k, 0.0):g})" for k, v in needed.items())
        raise ValueError(
            f"sweep.cluster_resources: the largest trial needs {short} at once (driver, "
            f"resources.num_workers learners, rl.rollout.num_actors rollout actors); {source} has less. "
            "Declare in sweep.cluster_resources what an autoscaling cluster can reach, or lower the trial's "
            "resources"
        )
    return min(cfg.sweep.max_concurrent_trials, fits)


def build_tuner(
    cfg: ExperimentConfig, specs: list[TrialSpec], phase: int = 0, trainable: Any = train_trial
) -> tune.Tuner:
    """A new Tuner over ``specs``, or the restored one when this sweep ran (part-way) before.

    Phase 0 is Tune experiment ``sweep.name``; phase 1 (RL after SFT) is ``<sweep.name>-after-sft``.
    Each trial runs ``trainable`` (``train_trial``; a test passes a cheap one) in ``trial_placement``.
    """
    trainable = tune.with_resources(trainable, trial_placement)
    folder = tune_dir(cfg, phase)
    name = folder.name
    fs = ray_storage(folder)  # on an object store: Tune's key and filesystem
    path = fs.pop("storage_path")
    if tune.Tuner.can_restore(path, **fs):
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True, **fs)
    scheduler = None
    if cfg.sweep.scheduler == "asha":
        scheduler = ASHAScheduler(metric="target/accuracy", mode="max", time_attr="step")
    return tune.Tuner(
        trainable,
        param_space={
            "config": config_to_dict(cfg),
            "spec": tune.grid_search([asdict(s) for s in specs]),
        },
        tune_config=tune.TuneConfig(
            max_concurrent_trials=concurrent_trials(cfg, specs, ray.cluster_resources()),
            scheduler=scheduler,
            trial_dirname_creator=lambda trial: trial.config["spec"]["name"],
        ),
        run_config=tune.RunConfig(name=name, **ray_storage(folder.parent), verbose=1),
    )


def collect_results(cfg: ExperimentConfig, specs: list[TrialSpec]) -> pl.DataFrame:
    """The results table from the trial folders: every evaluated checkpoint of every trial."""
    rows = []
    for spec in specs:
        for record in list_checkpoints(trials_root(cfg) / spec.name):
            rows.append(
                {
                    "trial": spec.name,
                    "method": spec.method,
                    "learning_rate": spec.learning_rate,
                    "seed": spec.seed,
                    "init": trial_init(trials_root(cfg) / spec.name),
                    "step": record.step,
                    "checkpoint": record.path,
                    "metrics": record.metrics,
                    "item_scores": record.item_scores,
                }
            )
    return build_results_table(rows)


def run_sweep(cfg: ExperimentConfig) -> pl.DataFrame:
    """Run (or resume) the sweep; returns the results table, also written to storage and MLflow."""
    specs = plan_trials(cfg)
    check_plan(cfg, specs)
    parent = tracking.get_or_create_parent_run(cfg)  # before the trials, so they all find this one
    repair_sweep(cfg, specs)
    parent.log_params({"sweep.trials": len(specs)})
    folder = sweep_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / PLAN_FILE) as tmp:
        tmp.write_text(json.dumps([asdict(s) for s in specs], indent=1))
    for phase, phase_specs in enumerate(sweep_phases(cfg, specs)):
        results = build_tuner(cfg, phase_specs, phase).fit()
        table = collect_results(cfg, specs)
        path = write_results(table, storage_root(cfg))
        parent.log_artifact(path, artifact_path="results")
        parent.log_artifact(path.with_suffix(".csv"), artifact_path="results")
        unfinished = len(results) - results.num_terminated - results.num_errors
        if unfinished:
            # Tune takes the first Ctrl-C itself: it stops the trials, saves its state and returns, so the
            # stages after the sweep would run on half-trained trials. Stop here as an interrupt does.
            raise KeyboardInterrupt(
                f"sweep {cfg.sweep.name}: interrupted, {unfinished} of {len(results)} trials of this phase "
                "unfinished; rerun the same command to resume them"
            )
        failed = [r for r in results if r.error is not None]
        if failed:
            names = ", ".join(str(r.config["spec"]["name"]) for r in failed)
            raise RuntimeError(
                f"sweep {cfg.sweep.name}: {len(failed)} of {len(specs)} trials failed ({names}); "
                f"first error: {failed[0].error}; rerun the same command to resume them"
            )
    return table
