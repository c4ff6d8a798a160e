"""One trial = one Ray Train run of one method at one (lr, seed): the driver side.

``run_trial`` builds the ``TorchTrainer`` (workers, resources and failure policy from the config), points
it at ``<storage>/trials/<trial>/``, and returns the trial's evaluated checkpoints. A trial that finished
before is not run again: its ``trial.json`` (written last, atomically) lists the checkpoints. A trial that
stopped part-way is rerun under the same name and storage, and its workers resume from the latest
checkpoint (Ray Train V2's resume: ``ray.train.get_checkpoint()`` inside the loop).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.placement_group import PlacementGroup

from dcv import tracking
from dcv.config import ExperimentConfig, config_to_dict
from dcv.storage import (
    CORRUPT_MARK,
    StoragePath,
    as_path,
    atomic_path,
    benchmarks_dir,
    circuits_dir,
    file_slug,
    items_dir,
    model_folder_problem,
    ray_storage,
    read_json,
    set_aside,
    storage_root,
    trials_dir,
)
from dcv.training.checkpoint_folders import (
    CHECKPOINT_FOLDERS,
    METADATA_FILE,
    KeepResumeStateInLatest,
    keep_resume_state_only_in,
    trim_finished_trial,
)

METHODS = ("sft", "rl")
TRIAL_FILE = "trial.json"
TRIAL_CONFIG_FILE = "trial_config.json"  # the config a trial folder was started with
# Sections that do not change what a trial trains or how it is evaluated.
NOT_TRAINING = ("tracking", "patching", "circuits", "storage", "sweep")

# Environment for every Ray worker of a dcv job, in one place. A value already set in the environment
# (e.g. by `ray job submit --runtime-env-json`) wins over these defaults.
RUNTIME_ENV_DEFAULTS = {
    # TRL warns on every GRPOTrainer built with rollout_func (experimental API, pinned to trl 1.16.x).
    "TRL_EXPERIMENTAL_SILENCE": "1",
    # HF tokenizers fork worker threads; inside Ray worker processes that only warns and oversubscribes.
    "TOKENIZERS_PARALLELISM": "false",
    # Ray Train V2 replaces `print` in its workers with one that also logs what is printed into a
    # redirected sys.stdout. datasets fingerprints each function TRL maps over a dataset with dill, and
    # dill (detect.nestedglobals) reads a function's globals from `dis.dis` output captured in a StringIO:
    # patched, every captured line of bytecode was logged and reached the terminal (662 lines in make
    # demo). Off, prints go to the worker's stdout and the capture stays a capture; the fingerprints are
    # the same. ray/train/v2/_internal/logging/patch_print.py (ray 2.60), dill/detect.py (dill 0.4).
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # Progress bars in workers (every model load: "Loading weights ... 272/272", dataset maps, lm-eval's
    # requests) have no one watching; in the run's log they are only noise. huggingface_hub's switch also
    # turns off transformers' bars (transformers.utils.logging reads it); tqdm >= 4.66 reads TQDM_*
    # defaults, which covers the bars of libraries that use tqdm directly.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
}


def runtime_env_vars(environ: dict[str, str]) -> dict[str, str]:
    """The defaults above, overridden by values the user already set."""
    return {key: environ.get(key, value) for key, value in RUNTIME_ENV_DEFAULTS.items()}


@dataclass(frozen=True)
class CheckpointRecord:
    step: int
    path: str
    metrics: dict[str, float]
    # Per-item scores (``target/correct``, ``probe/<name>/ld``); empty for checkpoints from before them.
    item_scores: dict[str, list[float]] = field(default_factory=dict)


def learning_rate(cfg: ExperimentConfig, method: str) -> float:
    return cfg.sft.learning_rate if method == "sft" else cfg.rl.learning_rate


def trial_name(cfg: ExperimentConfig, method: str, seed: int) -> str:
    return f"{method}-lr{learning_rate(cfg, method):g}-seed{seed}"


def trials_root(cfg: ExperimentConfig) -> StoragePath:
    return trials_dir(storage_root(cfg))


def list_checkpoints(trial_dir: str | StoragePath) -> list[CheckpointRecord]:
    """Evaluated checkpoints of a trial folder, by step (each folder's metadata names its step). A folder
    that fails ``checkpoint_problem`` (a copy Ray had not finished persisting when it was killed) is left
    out with a warning: it is no evaluated checkpoint."""
    records = []
    for meta in _checkpoint_markers(as_path(trial_dir)):
        problem = checkpoint_problem(meta.parent)
        if problem:
            warnings.warn(f"{meta.parent}: {problem}; left out of the trial's checkpoints", stacklevel=2)
            continue
        data = json.loads(meta.read_text())
        items = data.get("item_scores", {})  # absent in checkpoints from before per-item scores
        records.append(CheckpointRecord(int(data["step"]), str(meta.parent), data["metrics"], items))
    return sorted(records, key=lambda r: r.step)


def _checkpoint_markers(trial_dir: StoragePath) -> list[StoragePath]:
    """``checkpoint_*/<METADATA_FILE>`` under a trial folder (two levels: an ``ObjectPath`` globs one)."""
    folders = trial_dir.glob(CHECKPOINT_FOLDERS) if trial_dir.is_dir() else []
    return sorted((f / METADATA_FILE for f in folders), key=str)


def checkpoint_problem(folder: str | StoragePath, step: int | None = None) -> str | None:
    """What is wrong with an evaluated checkpoint folder, or None. Its marker (``dcv_checkpoint.json``)
    parses and names its step and metrics; the step is the one in the folder's name
    (``checkpoint_<step:06d>``), in ``trainer_state.json`` where there is one, and ``step`` when given;
    and the model folder has its config and loadable weights (``dcv.storage.model_folder_problem``)."""
    folder = as_path(folder)
    try:
        meta = json.loads((folder / METADATA_FILE).read_bytes())
        marked = int(meta["step"])
        if not isinstance(meta["metrics"], dict):
            raise TypeError("metrics")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{METADATA_FILE}: unreadable or incomplete ({type(exc).__name__})"
    if folder.name != f"checkpoint_{marked:06d}" or (step is not None and step != marked):
        return f"{METADATA_FILE} says step {marked}, which is not this folder's (expected {step})"
    state = folder / "trainer_state.json"
    if state.is_file():
        try:
            global_step = int(json.loads(state.read_bytes())["global_step"])
        except (OSError, ValueError, KeyError, TypeError):
            return "trainer_state.json: unreadable"
        if global_step != marked:
            return f"trainer_state.json is at step {global_step}, the checkpoint at step {marked}"
    return model_folder_problem(folder)


def finished_trial(cfg: ExperimentConfig, name: str) -> list[CheckpointRecord] | None:
    """A finished trial's checkpoints, or None when it has not finished or is no longer valid (its
    ``trial.json`` unreadable, or one of its checkpoint folders failing ``checkpoint_problem``). Reads
    only; ``repair_trial`` moves what is invalid aside."""
    return _finished_or_problem(cfg, name)[0]


def _finished_or_problem(cfg: ExperimentConfig, name: str) -> tuple[list[CheckpointRecord] | None, str]:
    path = trials_root(cfg) / name / TRIAL_FILE
    if not path.is_file():
        return None, ""
    try:
        records = [CheckpointRecord(**r) for r in json.loads(path.read_bytes())["checkpoints"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"{TRIAL_FILE}: unreadable or incomplete ({type(exc).__name__})"
    for record in records:
        problem = checkpoint_problem(record.path, record.step)
        if problem:
            return None, f"checkpoint {as_path(record.path).name}: {problem}"
    return records, ""


def repair_trial(cfg: ExperimentConfig, name: str) -> bool:
    """Move an invalid finished trial aside (``dcv.storage.set_aside``), so that it is redone; True if
    anything moved. An unreadable ``trial.json`` alone is moved aside: the trial's Ray Train run resumes
    from its latest checkpoint and writes it again. A checkpoint folder that fails ``checkpoint_problem``
    moves the whole trial folder aside (Ray's checkpoint list names that folder, so the run could not
    resume from it), and the trial's MLflow run is retired (``tracking.retire_child_run``): the trial is
    trained again from the start into a fresh run."""
    records, problem = _finished_or_problem(cfg, name)
    if records is not None or not problem:
        return False
    trial_dir = trials_root(cfg) / name
    if problem.startswith(TRIAL_FILE):
        set_aside(trial_dir / TRIAL_FILE, problem)
        return True
    moved = set_aside(trial_dir, f"trial {name}: {problem}")
    tracking.retire_child_run(cfg, name, f"trial folder moved aside to {moved.name}")
    forget_outputs(cfg, name)
    return True


def forget_outputs(cfg: ExperimentConfig, name: str) -> None:
    """Move aside the later stages' files made from a trial's checkpoints (patching items, circuits,
    benchmark scores), when the trial is trained again: they are keyed by checkpoint path, which the new
    checkpoints share. Their names start with the model id ``<trial>@<step>`` as a file slug."""
    import re

    storage = storage_root(cfg)
    own = re.compile(rf"{re.escape(file_slug(name))}_\d+__")
    for folder in (items_dir(storage), circuits_dir(storage) / "models", benchmarks_dir(storage) / "models"):
        for path in sorted(folder.glob("*")) if folder.is_dir() else []:
            if own.match(path.name) and CORRUPT_MARK not in path.name:
                set_aside(path, f"made from trial {name}'s checkpoints, which are trained again")


def trial_init(trial_dir: StoragePath) -> str:
    """Where a trial started ("base" or "sft:<trial>@<step>"); "base" for folders from before it was kept."""
    path = as_path(trial_dir) / TRIAL_FILE
    if path.is_file():
        return json.loads(path.read_text()).get("init", "base")
    return "base"


def start_point(cfg: ExperimentConfig, method: str, seed: int) -> tuple[str, str | None]:
    """(init label, checkpoint folder) a trial starts from: ("base", None), or for GRPO after SFT
    ("sft:<trial>@<step>", that checkpoint). The SFT trial must have finished: an RL trial never starts
    from a checkpoint its SFT run could still replace."""
    if method == "sft" or cfg.rl.init == "base":
        return "base", None
    rate = cfg.rl.init_sft_learning_rate or cfg.sft.learning_rate
    sft_trial = cfg.rl.init_trial or f"sft-lr{rate:g}-seed{seed}"  # trial_name at that rate
    records = finished_trial(cfg, sft_trial)
    if records is None:
        raise ValueError(
            f"rl.init_trial: SFT trial {sft_trial!r} has not finished under {trials_root(cfg)}; "
            f"train it first (dcv train CONFIG --method sft) or name another with rl.init_trial"
        )
    steps = [r.step for r in records]
    step = max(steps) if cfg.rl.init_step is None else cfg.rl.init_step
    if step not in steps:
        raise ValueError(
            f"rl.init_step: SFT trial {sft_trial!r} has no checkpoint at step {step} (it has {steps})"
        )
    record = next(r for r in records if r.step == step)
    return f"sft:{sft_trial}@{step}", record.path


def training_config(cfg: ExperimentConfig) -> dict:
    return {k: v for k, v in config_to_dict(cfg).items() if k not in NOT_TRAINING}


def check_trial_config(cfg: ExperimentConfig, trial_dir: StoragePath) -> None:
    """Refuse to resume or reuse a trial folder that was started with a different training config."""
    started = read_json(trial_dir / TRIAL_CONFIG_FILE)  # an unreadable one is moved aside, then rewritten
    if started is None:
        return
    before, now = (
        tracking.flatten_params(started),
        tracking.flatten_params(training_config(cfg)),
    )
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        details = ", ".join(f"{k}: {before.get(k)} -> {now.get(k)}" for k in changed[:5])
        raise ValueError(
            f"{trial_dir} holds trial {trial_dir.name} trained with a different config ({details}); "
            "use another storage.root or name, or delete that folder to retrain"
        )


def learner_scaling(cfg: ExperimentConfig) -> ScalingConfig:
    """The trial's Ray Train workers (learners). Ray Train V2 reserves them in a placement group of its own
    (ray/train/v2/_internal/execution/worker_group/worker_group.py, ``_create_placement_group``): it has
    no way to use bundles of the Tune trial's group, so a sweep reserves only the rollout actors there."""
    res = cfg.resources
    per_worker = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if res.use_gpu else {})}
    return ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu, resources_per_worker=per_worker)


def run_trial(
    cfg: ExperimentConfig,
    method: str,
    seed: int | None = None,
    name: str | None = None,
    callbacks: Sequence[Any] = (),
    rollout_placement: PlacementGroup | None = None,
) -> list[CheckpointRecord]:
    """Train one trial (or return a finished one's checkpoints without training).

    ``name`` defaults to ``trial_name(cfg, method, seed)`` (a sweep adds its grid values); ``callbacks``
    are Ray Train callbacks (a sweep passes Tune's ``TuneReportCallback``); ``rollout_placement``: the
    placement group whose bundles were reserved for an RL trial's rollout actors (a sweep passes its Tune
    trial's group, `dcv.training.sweep.trial_placement`).
    """
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    seed = cfg.sweep.seeds[0] if seed is None else seed
    init, init_checkpoint = start_point(cfg, method, seed)
    name = name or trial_name(cfg, method, seed)
    trial_dir = trials_root(cfg) / name
    repair_trial(cfg, name)
    check_trial_config(cfg, trial_dir)
    done = finished_trial(cfg, name)
    if done is not None:
        return done
    with atomic_path(trial_dir / TRIAL_CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(training_config(cfg), indent=1))
    uri = tracking.resolve_tracking_uri(cfg)
    lr = learning_rate(cfg, method)
    tags = {"dcv.stage": "train", "dcv.method": method, "dcv.seed": str(seed), "dcv.lr": f"{lr:g}"}
    run = tracking.get_or_create_child_run(cfg, name, tags=tags)
    run.log_params(
        {"trial.method": method, "trial.seed": seed, "trial.learning_rate": lr, "trial.init": init}
    )
    if method == "sft":
        from dcv.training.sft import train_loop_per_worker
    else:
        from dcv.training.grpo import train_loop_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config_to_dict(cfg),
            "trial": name,
            "seed": seed,
            "tracking_uri": uri,
            "run_id": run.run_id,
            "init_checkpoint": init_checkpoint,
            "rollout_placement": rollout_placement,
        },
        scaling_config=learner_scaling(cfg),
        run_config=RunConfig(
            name=name,
            **ray_storage(trials_root(cfg)),
            failure_config=FailureConfig(max_failures=cfg.resources.max_failures),
            # Every evaluated checkpoint is kept (later stages read them all); only the latest keeps its
            # optimizer, scheduler and RNG state.
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            callbacks=[*callbacks, KeepResumeStateInLatest()],
        ),
    )
    try:
        trainer.fit()
    except BaseException:
        run.finish("FAILED")
        raise
    records = list_checkpoints(trial_dir)
    if records:
        # Again, for resume state the callback missed (a controller that died between a checkpoint's
        # registration and its callback, or an earlier attempt of this trial).
        keep_resume_state_only_in(records[-1].path)
    with atomic_path(trial_dir / TRIAL_FILE) as tmp:
        tmp.write_text(
            json.dumps(
                {
                    "trial": name,
                    "method": method,
                    "seed": seed,
                    "learning_rate": lr,
                    "init": init,
                    "checkpoints": [asdict(r) for r in records],
                },
                indent=1,
            )
        )
    # Finished: nothing resumes it; step 0's weights become a hard link to the experiment's base snapshot
    # (dcv run's <storage>/base/; never to a model folder outside the storage).
    snapshot = storage_root(cfg) / "base"
    trim_finished_trial(trial_dir, snapshot if cfg.model.name == str(snapshot) else None)
    run.finish()
    return records
