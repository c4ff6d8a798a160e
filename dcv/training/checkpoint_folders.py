"""What a trial's checkpoint folders hold, and which of it is deleted when.

Ray Train writes one folder per evaluated checkpoint under ``<storage>/trials/<trial>/``
(``checkpoint_000012``). Each keeps for good what the analysis reads: the weights, the tokenizer,
``trainer_state.json`` and ``dcv_checkpoint.json`` (``METADATA_FILE``). Only the trial's latest keeps the
state training resumes from (``RESUME_STATE``; AdamW's is twice the fp32 weights):
``KeepResumeStateInLatest`` deletes the older ones' once Ray has registered a newer checkpoint that has
its own, and ``trim_finished_trial`` the latest's once the trial has finished (and hard-links step 0's
weights to the base snapshot).

A module of its own, light to import (no torch, transformers or MLflow), because Ray Train's controller
process unpickles ``KeepResumeStateInLatest`` from the run config: importing `dcv.training.checkpoints`
there cost about 10 s of CPU per trial on 2 cores (2026-12-07).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import ray.train

from dcv.storage import StoragePath, as_path, checkpoint_path, remove

# Inside each checkpoint folder: step, method, trial, metrics, item_scores.
METADATA_FILE = "dcv_checkpoint.json"
# Ray Train's checkpoint folders (checkpoint_000012), not its checkpoint_manager_snapshot.json beside them.
CHECKPOINT_FOLDERS = "checkpoint_[0-9]*"
# What a checkpoint holds only so that training can resume from it: HF Trainer's _save_checkpoint writes
# the optimizer (optimizer.pt; FSDP: optimizer.bin or optimizer_<n>/ shards), LR scheduler, grad scaler
# and each rank's RNG state beside the weights; under FSDP also accelerate's copy of the model that it
# resumes from (pytorch_model_fsdp.bin, or pytorch_model_fsdp_<n>/ shards). Weights, tokenizer,
# trainer_state.json (the log history) and dcv_checkpoint.json stay in every checkpoint.
OPTIMIZER_STATE = ("optimizer.pt", "optimizer.bin", "optimizer_*")
RESUME_STATE = (*OPTIMIZER_STATE, "pytorch_model_fsdp*", "scheduler.pt", "scaler.pt", "rng_state*.pth")


def has_resume_state(folder: str | StoragePath) -> bool:
    return any(any(as_path(folder).glob(pattern)) for pattern in OPTIMIZER_STATE)


def checkpoint_step(folder: str | StoragePath) -> int | None:
    """The step in a Ray checkpoint folder's name (``checkpoint_000012``); None for other names."""
    prefix, _, digits = as_path(folder).name.partition("_")
    return int(digits) if prefix == "checkpoint" and digits.isdigit() else None


def keep_resume_state_only_in(latest: str | StoragePath) -> list[StoragePath]:
    """Delete the resume state of the checkpoints before ``latest`` in its trial folder; the deleted paths.

    Nothing is deleted unless ``latest`` holds resume state itself, so the trial always keeps one
    resumable checkpoint. Folders of later steps are left alone: they can only be a killed attempt's
    partial upload, which the resumed run overwrites (and may be writing now).
    """
    latest = as_path(latest)
    step = checkpoint_step(latest)
    if step is None or not has_resume_state(latest):
        return []
    deleted = []
    for folder in latest.parent.glob(CHECKPOINT_FOLDERS):
        older = checkpoint_step(folder)
        if older is None or older >= step:
            continue
        for pattern in RESUME_STATE:
            for path in folder.glob(pattern):
                remove(path)
                deleted.append(path)
    return deleted


def trim_finished_trial(trial_dir: StoragePath, base_folder: StoragePath | None) -> list[StoragePath]:
    """Disk a finished trial (its ``trial.json`` written) no longer needs; the paths trimmed.

    Nothing resumes a finished trial, so its latest checkpoint's resume state goes too (AdamW's state is
    1.08 GB for SmolLM2). A checkpoint's weights that are byte-identical to the base snapshot's (step 0
    of a trial started from the base: 0.54 GB per trial) become a hard link to that file, so a folder
    still holds its own complete model and ``du`` counts the bytes once. An object store has no links:
    there step 0 keeps its own copy.
    """
    import filecmp

    trimmed = []
    local = isinstance(base_folder, Path)
    base_weights = base_folder / "model.safetensors" if local else None
    for folder in sorted(as_path(trial_dir).glob(CHECKPOINT_FOLDERS), key=str):
        for pattern in RESUME_STATE:
            for path in folder.glob(pattern):
                remove(path)
                trimmed.append(path)
        weights = folder / "model.safetensors"
        if base_weights is None or not base_weights.is_file() or not weights.is_file():
            continue
        if os.path.samefile(weights, base_weights) or weights.stat().st_size != base_weights.stat().st_size:
            continue
        if filecmp.cmp(weights, base_weights, shallow=False):
            link = weights.with_name(weights.name + ".link")
            link.unlink(missing_ok=True)
            os.link(base_weights, link)
            os.replace(link, weights)  # atomic: the folder never lacks its weights
            trimmed.append(weights)
    return trimmed


class KeepResumeStateInLatest(ray.train.UserCallback):
    """Ray Train callback: once a checkpoint is registered, the older ones lose their resume state.

    It runs on the Train controller after Ray has made the new checkpoint the one every restart resumes
    from: the workers' (default, synchronous) upload has finished before their report reaches the
    controller, and the controller's CheckpointManager, the first report callback, has registered it and
    written the snapshot a rerun reads before user callbacks run (ray/train/v2/_internal/execution/
    controller/controller.py, checkpoint/checkpoint_manager.py; ray 2.60).
    """

    def after_report(self, run_context, metrics, checkpoint):
        if checkpoint is None:
            return
        try:
            keep_resume_state_only_in(checkpoint_path(checkpoint))
        except OSError as error:  # only disk is lost; run_trial sweeps again when the trial ends
            warnings.warn(f"{checkpoint.path}: could not delete older resume state: {error}", stacklevel=2)
