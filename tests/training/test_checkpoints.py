"""Checkpoint storage: only a trial's latest checkpoint keeps the state to resume from."""

from __future__ import annotations

from pathlib import Path

import ray.train

from dcv.training.checkpoint_folders import (
    METADATA_FILE,
    KeepResumeStateInLatest,
    checkpoint_step,
    has_resume_state,
    keep_resume_state_only_in,
    trim_finished_trial,
)

KEPT = ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.json", METADATA_FILE)
RESUME = ("optimizer.pt", "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth")


def write_checkpoint(trial: Path, step: int, resumable: bool = True) -> Path:
    """A Ray checkpoint folder as an HF Trainer save merges into it (step 0: weights only)."""
    folder = trial / f"checkpoint_{step:06d}"
    folder.mkdir(parents=True)
    for name in KEPT + (RESUME if resumable else ()):
        (folder / name).write_text(name)
    if resumable:
        (folder / "optimizer_0").mkdir()  # FSDP's sharded optimizer state is a folder
        (folder / "optimizer_0" / "shard.distcp").write_text("shard")
    return folder


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_older_checkpoints_lose_their_resume_state_and_keep_what_analysis_reads(tmp_path):
    base = write_checkpoint(tmp_path, 0, resumable=False)
    older, latest = write_checkpoint(tmp_path, 2), write_checkpoint(tmp_path, 4)
    partial = write_checkpoint(tmp_path, 6)  # a killed attempt's upload: not this call's to judge
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")
    deleted = keep_resume_state_only_in(latest)
    assert {p.name for p in deleted} == {*RESUME, "optimizer_0"}
    assert names(older) == set(KEPT) and not has_resume_state(older)
    assert names(base) == set(KEPT)
    for folder in (latest, partial):
        assert names(folder) == {*KEPT, *RESUME, "optimizer_0"} and has_resume_state(folder)
    assert keep_resume_state_only_in(latest) == []  # a second pass finds nothing left to delete


def test_nothing_is_deleted_unless_the_latest_can_resume(tmp_path):
    older = write_checkpoint(tmp_path, 2)
    latest = write_checkpoint(tmp_path, 4, resumable=False)
    assert keep_resume_state_only_in(latest) == []
    assert has_resume_state(older) and (older / "rng_state_0.pth").is_file()


def test_the_ray_callback_prunes_on_every_reported_checkpoint(tmp_path):
    base, first = write_checkpoint(tmp_path, 0, resumable=False), write_checkpoint(tmp_path, 3)
    callback = KeepResumeStateInLatest()
    callback.after_report(None, [{"step": 0.0}], None)  # a report without a checkpoint
    callback.after_report(None, [{"step": 0.0}], ray.train.Checkpoint.from_directory(str(base)))
    assert has_resume_state(first)  # the base checkpoint has no state of its own to keep instead
    second = write_checkpoint(tmp_path, 6)
    callback.after_report(None, [{"step": 6.0}], ray.train.Checkpoint.from_directory(str(second)))
    assert not has_resume_state(first) and has_resume_state(second)


def test_checkpoint_step_reads_ray_folder_names():
    assert checkpoint_step(Path("/t/checkpoint_000012")) == 12
    assert checkpoint_step(Path("/t/checkpoint-12")) is None
    assert checkpoint_step(Path("/t/checkpoint_manager_snapshot.json")) is None


def test_a_finished_trial_loses_all_resume_state_and_shares_the_base_weights(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"base weights")
    trial = tmp_path / "trial"
    step0, step4 = write_checkpoint(trial, 0), write_checkpoint(trial, 4)
    (step0 / "model.safetensors").write_bytes(b"base weights")  # step 0 from "base": the same bytes
    (step4 / "model.safetensors").write_bytes(b"trained wts!")  # same size, other bytes: kept as is
    trim_finished_trial(trial, base)
    for folder in (step0, step4):
        assert names(folder) == set(KEPT), folder.name
    assert (step0 / "model.safetensors").samefile(base / "model.safetensors")
    assert not (step4 / "model.safetensors").samefile(base / "model.safetensors")
    assert (step4 / "model.safetensors").read_bytes() == b"trained wts!"
    assert trim_finished_trial(trial, base) == []  # nothing left to trim: a rerun changes nothing


def test_checkpoints_keep_the_model_dtype_when_training_upcasts_it(tmp_path, tokenizer):
    """FSDP2 with bf16 trains fp32 master weights (accelerate upcasts the parameters), so the Trainer's
    save gets an fp32 state dict from an fp32 model: SavesInModelDtype still writes bf16 weights and
    ``dtype: bfloat16`` in config.json, as step 0 has. (Under FSDP on Ray: tests/training/test_fsdp.py.)"""
    import json

    import torch
    from safetensors.torch import load_file
    from transformers import Trainer, TrainingArguments

    from dcv.config import ModelConfig
    from dcv.models import load_model
    from dcv.training.checkpoints import SavesInModelDtype

    class BF16Trainer(SavesInModelDtype, Trainer):
        pass

    model = load_model(ModelConfig(name="tiny", dtype="bfloat16"), tokenizer)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    trainer = BF16Trainer(model=model, args=args, save_dtype=torch.bfloat16)
    model.float()  # what accelerate's fsdp2_prepare_model does to a bf16 model under mixed precision
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    trainer._save(str(tmp_path / "checkpoint"), state_dict=state)
    saved = load_file(str(tmp_path / "checkpoint" / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "checkpoint" / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(torch.equal(saved[k], state[k].to(torch.bfloat16)) for k in saved)
