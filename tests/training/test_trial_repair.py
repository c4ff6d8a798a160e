"""Finished trials read back: checkpoint folders validated, an invalid trial moved aside and redone."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file

from dcv import tracking
from dcv.storage import SetAsideWarning
from dcv.training.checkpoint_folders import METADATA_FILE
from dcv.training.sweep import plan_trials, repair_sweep, tune_dir
from dcv.training.trial import (
    TRIAL_FILE,
    CheckpointRecord,
    checkpoint_problem,
    finished_trial,
    list_checkpoints,
    repair_trial,
    trials_root,
)


def write_checkpoint(trial_dir: Path, step: int, state_step: int | None = None) -> Path:
    folder = trial_dir / f"checkpoint_{step:06d}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"w": torch.zeros(8, 8)}, folder / "model.safetensors")
    (folder / METADATA_FILE).write_text(json.dumps({"step": step, "metrics": {"target/accuracy": 0.5}}))
    if step:
        (folder / "trainer_state.json").write_text(
            json.dumps({"global_step": step if state_step is None else state_step})
        )
    return folder


def write_finished_trial(trial_dir: Path, steps=(0, 4)) -> list[Path]:
    folders = [write_checkpoint(trial_dir, step) for step in steps]
    records = [
        asdict(CheckpointRecord(s, str(f), {"target/accuracy": 0.5}))
        for s, f in zip(steps, folders, strict=True)
    ]
    (trial_dir / TRIAL_FILE).write_text(json.dumps({"trial": trial_dir.name, "checkpoints": records}))
    return folders


def test_checkpoint_problem_checks_marker_step_and_weights(tmp_path):
    folder = write_checkpoint(tmp_path, 4)
    assert checkpoint_problem(folder) is None and checkpoint_problem(folder, 4) is None
    assert "says step 4" in checkpoint_problem(folder, 8)
    assert "trainer_state.json is at step 3" in checkpoint_problem(write_checkpoint(tmp_path / "b", 4, 3))
    renamed = folder.rename(tmp_path / "checkpoint_000008")
    assert "not this folder's" in checkpoint_problem(renamed)
    (renamed / METADATA_FILE).write_text('{"step": 8, "metr')
    assert "unreadable or incomplete" in checkpoint_problem(renamed)
    folder = write_checkpoint(tmp_path / "c", 4)
    (folder / "model.safetensors").unlink()
    assert "no weights file" in checkpoint_problem(folder)


def test_list_checkpoints_leaves_out_a_half_persisted_folder(tmp_path):
    good, broken = write_checkpoint(tmp_path, 0), write_checkpoint(tmp_path, 4)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # Ray was killed while it copied the checkpoint
    with pytest.warns(UserWarning, match="truncated"):
        assert [r.path for r in list_checkpoints(tmp_path)] == [str(good)]


def test_a_checkpoint_without_weights_moves_the_trial_aside_and_retires_its_run(tiny_config):
    spec = next(s for s in plan_trials(tiny_config) if s.method == "sft")
    trial_dir = trials_root(tiny_config) / spec.name
    folders = write_finished_trial(trial_dir)
    assert [r.step for r in finished_trial(tiny_config, spec.name)] == [0, 4]
    run = tracking.get_or_create_child_run(tiny_config, spec.name)
    assert repair_trial(tiny_config, spec.name) is False  # valid: nothing moves

    (folders[1] / "model.safetensors").unlink()
    assert finished_trial(tiny_config, spec.name) is None  # reads only: nothing moved yet
    assert trial_dir.exists()
    with pytest.warns(SetAsideWarning, match=rf"trial {spec.name}: checkpoint checkpoint_000004: no weights"):
        assert repair_trial(tiny_config, spec.name) is True
    assert not trial_dir.exists()
    [moved] = trial_dir.parent.glob(f"{spec.name}.corrupt-*")
    assert (moved / "checkpoint_000000" / "model.safetensors").is_file()  # kept whole, to inspect
    client = MlflowClient(tracking.resolve_tracking_uri(tiny_config))
    assert client.get_run(run.run_id).info.lifecycle_stage == "deleted"
    fresh = tracking.get_or_create_child_run(tiny_config, spec.name)
    assert fresh.run_id != run.run_id  # the retrained trial logs into a run of its own
    assert repair_trial(tiny_config, spec.name) is False


def test_an_unreadable_trial_json_alone_is_moved_aside(tiny_config):
    spec = next(s for s in plan_trials(tiny_config) if s.method == "rl")
    trial_dir = trials_root(tiny_config) / spec.name
    write_finished_trial(trial_dir)
    (trial_dir / TRIAL_FILE).write_text('{"trial": "x", "checkpoints": [')
    assert finished_trial(tiny_config, spec.name) is None
    with pytest.warns(SetAsideWarning, match=r"trial\.json: unreadable"):
        assert repair_trial(tiny_config, spec.name) is True
    assert (trial_dir / "checkpoint_000004" / "model.safetensors").is_file()  # the checkpoints stay
    assert not (trial_dir / TRIAL_FILE).exists() and len(list(trial_dir.glob(f"{TRIAL_FILE}.corrupt-*"))) == 1


def test_repairing_a_sweep_sets_tunes_state_aside_so_the_trial_runs_again(tiny_config):
    specs = plan_trials(tiny_config)
    for spec in specs:
        write_finished_trial(trials_root(tiny_config) / spec.name)
    state = tune_dir(tiny_config, 0)
    state.mkdir(parents=True)
    (state / "experiment_state.json").write_text("{}")
    assert repair_sweep(tiny_config, specs) == [] and state.exists()
    broken = trials_root(tiny_config) / specs[0].name / "checkpoint_000004" / METADATA_FILE
    broken.write_text("{")
    with pytest.warns(SetAsideWarning):
        assert repair_sweep(tiny_config, specs) == [specs[0].name]
    assert not state.exists() and len(list(state.parent.glob(f"{state.name}.corrupt-*"))) == 1
    assert finished_trial(tiny_config, specs[1].name) is not None  # the other trial is untouched
