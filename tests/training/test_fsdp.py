"""FSDP trials (``sft.distributed`` / ``rl.distributed: fsdp``) under a real local Ray Train: two CPU
workers sharding the tiny model over gloo (dcv.training.checkpoints.keep_fsdp_on_cpu)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dcv.config import ModelConfig, parse_config
from dcv.models import load_model
from dcv.training.checkpoint_folders import METADATA_FILE, has_resume_state
from dcv.training.checkpoints import distributed_args
from dcv.training.trial import run_trial
from tests.helpers import train_config_dict, train_with_a_kill


def fsdp_config(storage: Path, method: str, **values):
    section = "sft" if method == "sft" else "rl"
    return parse_config(train_config_dict(storage, workers=2, **{section: {"distributed": "fsdp", **values}}))


@pytest.mark.parametrize(
    ("architecture", "layer"), [("llama", "LlamaDecoderLayer"), ("qwen2", "Qwen2DecoderLayer")]
)
def test_fsdp_wraps_each_decoder_layer_of_any_family(tokenizer, architecture, layer):
    model = load_model(ModelConfig(name="tiny", tiny={"architecture": architecture}), tokenizer)
    args = distributed_args("fsdp", model)
    assert args["fsdp"] is True and args["fsdp_config"]["version"] == 2
    assert args["fsdp_config"]["transformer_layer_cls_to_wrap"] == [layer]
    assert args["fsdp_config"]["state_dict_type"] == "FULL_STATE_DICT"  # checkpoints hold whole weights
    assert distributed_args("ddp", model) == {}


def test_fsdp_sft_trial_saves_whole_bf16_weights_evaluates_lazily_and_resumes(
    ray_cluster, tmp_path, tokenizer
):
    """A bf16 model under FSDP2: accelerate trains fp32 master weights, and every checkpoint, step 0 and
    the trained ones, still holds bf16 weights with ``dtype: bfloat16`` in its config."""
    raw = train_config_dict(tmp_path / "store", workers=2, sft={"distributed": "fsdp", "max_steps": 6})
    raw["model"]["dtype"] = "bfloat16"
    cfg = parse_config(raw)
    # Killed once Ray Train has registered the step-2 checkpoint, so the restart resumes from a checkpoint.
    trial_dir, killed, result = train_with_a_kill(cfg, ray_cluster, after_step=2)
    # Killed mid-run, not after the last step. Step 4's checkpoint may already exist: the tiny model's
    # steps are faster than finding and killing a worker, so which one the restart resumes from is either.
    at_kill = [p for p in trial_dir.glob("checkpoint_*") if p.is_dir()]
    assert not (trial_dir / "checkpoint_000006").exists()
    # accelerate's FSDP save wrote the copy a restart resumes from (a DDP checkpoint has none).
    assert any((p / "pytorch_model_fsdp.bin").is_file() for p in at_kill), at_kill
    result["thread"].join(timeout=600)
    assert "records" in result, f"the trial did not finish after worker {killed} was killed"
    records = result["records"]
    assert [r.step for r in records] == [0, 2, 4, 6]
    state = json.loads((Path(records[-1].path) / "trainer_state.json").read_text())
    # Resumed from a checkpoint before the last: every step logged once, nothing lost, nothing counted twice.
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == list(range(1, 7))

    # Every checkpoint holds whole weights under the HF names (a shard would be a fraction of dim 0, a
    # wrapper would prefix the names), in bf16, which load into a fresh tiny model; tied lm_head.weight is
    # saved once, as embed_tokens.
    fresh = load_model(ModelConfig(name="tiny", dtype="bfloat16"), tokenizer)
    expected = {k: v.clone() for k, v in fresh.state_dict().items()}  # the base, before any load below
    folders = {r.step: Path(r.path) for r in records}
    weights = {step: load_file(str(folder / "model.safetensors")) for step, folder in folders.items()}
    for step, saved in weights.items():
        assert {k: v.shape for k, v in saved.items()} == {k: expected[k].shape for k in saved}, step
        assert {v.dtype for v in saved.values()} == {torch.bfloat16}, step
        assert json.loads((folders[step] / "config.json").read_text())["dtype"] == "bfloat16", step
        loaded = fresh.load_state_dict(saved, strict=False)
        assert not loaded.unexpected_keys and set(loaded.missing_keys) <= {"lm_head.weight"}, step
    # A finished trial keeps no resume state, accelerate's FSDP copy of the model included.
    for record in records:
        assert not has_resume_state(Path(record.path)), record.step
        assert not [*Path(record.path).glob("pytorch_model_fsdp*")], record.step
    assert all(torch.equal(weights[0][k], expected[k]) for k in weights[0])  # step 0 is the base model
    assert records[0].metrics["kl_to_base"] == pytest.approx(0.0, abs=1e-6)
    assert max(float((weights[6][k] - weights[0][k]).abs().max()) for k in weights[0]) > 0  # it trained

    # Rank 0 evaluated on Ray Train's device for it, with one kit per worker process, built at the
    # process's first evaluation (step 0, or the first step after the restart): after the trainer's set-up
    # and the weights' gather, never before the first collective.
    evaluation = {
        step: json.loads((folder / METADATA_FILE).read_text())["evaluation"]
        for step, folder in folders.items()
    }
    assert {e["device"] for e in evaluation.values()} == {"cpu"}
    assert {e["kits_built_by_process"] for e in evaluation.values()} == {1}
    assert evaluation[0]["kit_built_at_step"] == 0
    restarted = [step for step, e in evaluation.items() if e["kit_built_at_step"] != 0]
    assert restarted and {evaluation[step]["kit_built_at_step"] for step in restarted} == {restarted[0]}


def test_fsdp_grpo_trial_publishes_whole_weights(ray_cluster, tmp_path):
    """Each step's generation needs the actors at that step's version: every publish gathered both
    ranks' shards onto rank 0, and the hf rollout backend checked the names, shapes and dtypes it
    received against its own model before loading them (dcv.training.rollout.RolloutActor)."""
    cfg = fsdp_config(tmp_path / "store", "rl", max_steps=2, eval_every=2)
    records = run_trial(cfg, "rl", seed=0)
    assert [r.step for r in records] == [0, 2]
    state = json.loads((Path(records[-1].path) / "trainer_state.json").read_text())
    assert [entry["step"] for entry in state["log_history"] if "reward" in entry] == [1, 2]
    assert all(0 <= r.metrics["target/accuracy"] <= 1 for r in records)
