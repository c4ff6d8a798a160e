"""Training trials under a real local Ray Train, on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from dcv import tracking
from dcv.cli import main
from dcv.config import parse_config
from dcv.training.checkpoint_folders import has_resume_state
from dcv.training.trial import (
    TRIAL_FILE,
    finished_trial,
    list_checkpoints,
    run_trial,
    trial_name,
    trials_root,
)
from tests.helpers import train_config_dict, train_with_a_kill


def train_config(storage: Path, workers: int, **method_overrides):
    return parse_config(train_config_dict(storage, workers, **method_overrides))


def save_letter_model(tokenizer, folder: Path) -> Path:
    """The tiny model made to write only " A" .. " D": the random tiny model's 4-token completions never
    score (reward 0 everywhere, zero advantages, no gradient), this one's last letter is right about 1 time
    in 4, so GRPO groups have reward variance. Residual dimension 0 is a constant (every embedding holds
    10 there and no layer writes to it), and the letters' embeddings (tied to lm_head) hold 12: after the
    final norm that dimension is about 8, which lifts the letters' logits by about 16 over every other token.
    """
    from dcv.config import ModelConfig
    from dcv.models import load_model, save_model

    model = load_model(ModelConfig(name="tiny"), tokenizer)
    letters = [tokenizer(f" {c}", add_special_tokens=False)["input_ids"][0] for c in "ABCD"]
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed[:, 0] = 10.0
        embed[letters, 0] = 12.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0
            layer.mlp.down_proj.weight[0] = 0
    return save_model(model, tokenizer, folder)


def checkpoint_weights(folder: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_finished_trial_keeps_no_resume_state(records) -> None:
    """Every checkpoint keeps what the analysis reads. While the trial ran only the latest kept optimizer,
    scheduler and RNG state (KeepResumeStateInLatest, tests/training/test_checkpoints.py); once it has
    finished nothing resumes it, so none keeps any (trim_finished_trial)."""
    for record in records:
        folder = Path(record.path)
        assert (folder / "model.safetensors").is_file() and (folder / "dcv_checkpoint.json").is_file()
        assert not has_resume_state(folder), folder.name
        assert not [*folder.glob("rng_state*.pth"), *folder.glob("scheduler.pt")], folder.name


@pytest.fixture(scope="module")
def ddp_trial(ray_cluster, tmp_path_factory, tokenizer):
    """``ddp_trial(method)``: (config, records) of a two-worker DDP trial, trained once per method in this
    module; the tests only read it (the rerun test asserts that its reruns leave every file as it was)."""
    trained = {}

    def trial(method: str):
        if method not in trained:
            root = tmp_path_factory.mktemp(f"ddp-{method}")
            overrides = {}
            if method == "rl":
                # A policy whose rewards vary within a group (letter answers), 4 samples per group:
                # every step's groups are likely to hold a nonzero advantage (and seeded rollouts repeat
                # run to run).
                letter_model = save_letter_model(tokenizer, root / "letter-model")
                overrides = {
                    "model": {"name": str(letter_model)},
                    "target_task": {"answer_format": "letter"},
                    "rl": {"num_generations": 4, "per_device_batch_size": 4},
                }
            cfg = train_config(root / "store", workers=2, **overrides)
            trained[method] = (cfg, run_trial(cfg, method, seed=0))
        return trained[method]

    return trial


@pytest.mark.parametrize("method", ["sft", "rl"])
def test_two_worker_ddp_trial_leaves_evaluated_checkpoints(ddp_trial, method):
    cfg, records = ddp_trial(method)
    section = cfg.sft if method == "sft" else cfg.rl
    expected_steps = list(range(0, section.max_steps + 1, section.eval_every))
    assert [r.step for r in records] == expected_steps
    for record in records:
        assert 0 <= record.metrics["target/accuracy"] <= 1
        assert "probe/ioi/mean_ld" in record.metrics and "kl_to_base" in record.metrics
        assert (Path(record.path) / "model.safetensors").is_file()
    assert records[0].metrics["kl_to_base"] == pytest.approx(0.0, abs=1e-6)
    last = Path(records[-1].path)
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["global_step"] == section.max_steps
    # A finished trial keeps no resume state: both ranks' RNG parts went with it (trim_finished_trial).
    # Resuming from a latest checkpoint is tested by test_killed_worker_resumes_from_the_latest_checkpoint.
    assert_finished_trial_keeps_no_resume_state(records)
    train_key = "train/loss" if method == "sft" else "train/reward"
    assert all(train_key in r.metrics for r in records[1:])
    if method == "rl":
        # GRPO saw a nonzero advantage (a group whose rewards differ), hence a nonzero gradient, and the
        # final weights moved away from step 0's.
        logged = [e for e in state["log_history"] if "grad_norm" in e]
        assert len(logged) == section.max_steps
        assert any(e["reward_std"] > 0 and e["frac_reward_zero_std"] < 1 for e in logged)
        assert any(e["grad_norm"] > 0 for e in logged)
        start, end = checkpoint_weights(records[0].path), checkpoint_weights(records[-1].path)
        assert start.keys() == end.keys()
        assert max(float((start[k] - end[k]).abs().max()) for k in start) > 0

    client = MlflowClient(tracking.resolve_tracking_uri(cfg))
    runs = client.search_runs(
        [client.get_experiment_by_name("tiny-test").experiment_id],
        filter_string=f"tags.`dcv.run_key` = '{trial_name(cfg, method, 0)}'",
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "target/accuracy")
    assert sorted(m.step for m in history) == expected_steps


@pytest.mark.e2e  # and `dcv train` of the finished trial
def test_rerunning_a_finished_trial_does_not_train(ddp_trial, tmp_path, capsys, monkeypatch):
    cfg, first = ddp_trial("sft")  # finished by the two-worker test (or trained here, when run alone)
    store = Path(cfg.storage.root)
    trial_dir = trials_root(cfg) / trial_name(cfg, "sft", 0)
    stamps = {p: p.stat().st_mtime_ns for p in trial_dir.rglob("*")}
    again = run_trial(cfg, "sft", seed=0)
    assert again == first
    assert {p: p.stat().st_mtime_ns for p in trial_dir.rglob("*")} == stamps
    assert finished_trial(cfg, trial_name(cfg, "sft", 0)) == first
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(train_config_dict(store, workers=2)))
    capsys.readouterr()
    # `dcv train` in this process: the session's Ray is connected, so the command uses it (dcv.cli.init_ray).
    assert main(["train", str(config_file), "--method", "sft", "--seed", "0"]) == 0
    printed = capsys.readouterr().out
    assert "finished before; not retraining" in printed
    assert f"{first[-1].step:>6}" in printed
    changed = train_config(store, workers=2, sft={"max_steps": 6})
    with pytest.raises(ValueError, match=r"different config \(sft.max_steps: 4 -> 6\)"):
        run_trial(changed, "sft", seed=0)


def test_killed_worker_resumes_from_the_latest_checkpoint(ray_cluster, tmp_path):
    cfg = train_config(tmp_path / "store", workers=1, sft={"max_steps": 12, "eval_every": 3})
    # Killed once Ray Train has registered the step-3 checkpoint, so the restart must resume from it.
    trial_dir, killed, result = train_with_a_kill(cfg, ray_cluster, after_step=3)
    assert not (trial_dir / "checkpoint_000012").exists()  # killed mid-run, not after the last step
    result["thread"].join(timeout=600)
    assert "records" in result, f"the trial did not finish after worker {killed} was killed"
    records = result["records"]
    assert [r.step for r in records] == [0, 3, 6, 9, 12]
    assert records[0].metrics["kl_to_base"] == pytest.approx(0.0, abs=1e-6)  # step 0 is still the base model
    state = json.loads((Path(records[-1].path) / "trainer_state.json").read_text())
    logged_steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    # Every step logged exactly once: resumed after a checkpoint, nothing lost, nothing counted twice.
    assert logged_steps == list(range(1, 13))
    assert (trial_dir / TRIAL_FILE).is_file()
    assert list_checkpoints(trial_dir) == records
    assert_finished_trial_keeps_no_resume_state(records)
    # The restart resumed after a checkpoint: step 0 was evaluated once (a restart from scratch, or a
    # resume that re-reported the base, would log it twice). A step whose checkpoint was being persisted
    # when the worker died is evaluated again after the resume, so later steps may appear twice.
    client = MlflowClient(tracking.resolve_tracking_uri(cfg))
    run = client.search_runs(
        [client.get_experiment_by_name("tiny-test").experiment_id],
        filter_string=f"tags.`dcv.run_key` = '{trial_name(cfg, 'sft', 0)}'",
    )[0]
    logged = [m.step for m in client.get_metric_history(run.info.run_id, "target/accuracy")]
    assert logged.count(0) == 1 and set(logged) == {0, 3, 6, 9, 12}
