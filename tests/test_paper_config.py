"""The paper config, end to end at toy size: `dcv run configs/qwen2.5-3b.yaml` with only size overrides.

The overrides swap sizes and hardware, never the protocol: a tiny random Qwen2 (same family as the paper
model, its 16:2 query-to-key/value head ratio scaled to 8:1), a local folder in SciKnowEval's hub layout
(Chemistry L3, as the config asks), hf rollouts on CPU in place of vLLM, local benchmark files in place of
the hub's, a few items and steps. Everything else (rl.init sft, Dr. GRPO, masks, the chem probe,
calibration, benchmarks, FSDP) is the file's own.
"""

from __future__ import annotations

import json

import polars as pl
import pytest

from dcv.config import load_config
from dcv.storage import (
    WEIGHT_CHANGE_FILE,
    analysis_dir,
    benchmarks_dir,
    calibration_dir,
    circuits_dir,
    patching_dir,
    results_dir,
    weight_change_dir,
)
from tests.helpers import REPO, run_dcv, write_sciknoweval_layout

PAPER_CONFIG = REPO / "configs" / "qwen2.5-3b.yaml"

pytestmark = pytest.mark.e2e  # a whole `dcv run`

PROBES = [
    {"name": n, "n_items": 8, "seed": 0} for n in ("ioi", "capitals", "greater_than", "induction", "chem")
]


def toy_overrides(source, storage) -> list[str]:
    """Sizes and hardware only; each value is YAML, as a user would type it after --set."""
    sizes = {
        "model.name": "tiny",
        "model.dtype": "float32",  # CPU: half precision is slow and bf16 mixed precision needs a GPU
        "model.tiny": {
            "architecture": "qwen2",
            "num_layers": 2,
            "num_heads": 8,
            "num_kv_heads": 1,
            "hidden_size": 64,
            "intermediate_size": 128,
        },
        "target_task.source": str(source),
        "target_task.revision": None,  # a local folder has no hub revision
        "target_task.n_train": 16,
        "target_task.n_test": 8,
        "probes": PROBES,
        "evaluation": {
            "batch_size": 8,
            "max_new_tokens": 8,
            "kl_prompts": 4,
            "kl_samples_per_prompt": 1,
            "kl_max_new_tokens": 8,
            "kl_seed": 0,
        },
        "sft.per_device_batch_size": 2,
        "sft.gradient_accumulation_steps": 1,
        "sft.max_steps": 2,
        "sft.eval_every": 2,
        "sft.max_seq_length": 256,
        "rl.per_device_batch_size": 2,
        "rl.gradient_accumulation_steps": 1,
        "rl.num_generations": 2,
        "rl.max_completion_length": 4,
        "rl.max_steps": 2,
        "rl.eval_every": 2,
        "rl.rollout": {"backend": "hf", "num_actors": 1, "num_cpus": 0.5, "num_gpus": 0},
        "sweep.sft_learning_rates": [1.0e-5],
        "sweep.rl_learning_rates": [1.0e-6],
        "sweep.seeds": [0],  # one run per method: every stage runs; the analysis says n is too small
        "sweep.max_concurrent_trials": 1,  # rl.init sft: the RL trial waits for its SFT trial anyway
        "patching.batch_size": 8,
        "patching.head_chunk_size": 16,
        "patching.num_actors": 1,
        "patching.num_cpus_per_actor": 1,
        "patching.num_gpus_per_actor": 0,
        "circuits.k_max": 8,
        "circuits.n_bootstrap": 100,
        "circuits.mask.steps": 10,
        "calibration.k": [1],
        "benchmarks.tasks": ["dcv_winogrande"],
        "benchmarks.include_path": str(REPO / "configs" / "benchmarks"),
        "benchmarks.limit": 2,
        "benchmarks.batch_size": 2,
        "benchmarks.num_cpus": 1,
        "benchmarks.num_gpus": 0,
        "storage.root": str(storage),
        "resources": {
            "num_workers": 1,
            "use_gpu": False,
            "cpus_per_worker": 0.5,
            "gpus_per_worker": 0,
            "torch_threads": 1,
            "max_failures": 1,
        },
    }
    return [f"{key}={json.dumps(value)}" for key, value in sizes.items()]


def test_the_overrides_change_sizes_not_the_protocol(tmp_path):
    """What the toy twin keeps of the paper config: the protocol fields are the file's own."""
    source = write_sciknoweval_layout(tmp_path / "sciknoweval")
    paper = load_config(PAPER_CONFIG)
    toy = load_config(PAPER_CONFIG, toy_overrides(source, tmp_path / "store"))
    assert toy.model.tiny.architecture == "qwen2"
    assert paper.target_task.levels == toy.target_task.levels == ["L3"]
    for section, field in [
        ("rl", "init"),
        ("rl", "loss_type"),
        ("rl", "beta"),
        ("rl", "num_iterations"),
        ("sft", "distributed"),
        ("rl", "distributed"),
        ("patching", "methods"),
        ("circuits", "selection"),
        ("circuits", "noise_floor"),
        ("calibration", "enabled"),
        ("weight_change", "enabled"),
    ]:
        assert getattr(getattr(toy, section), field) == getattr(getattr(paper, section), field), field
    assert paper.rl.init == "sft" and paper.rl.loss_type == "dr_grpo" and "mask" in paper.patching.methods
    assert "chem" in [p.name for p in paper.probes] and paper.benchmarks.tasks


def test_the_paper_config_runs_end_to_end_at_toy_size(tmp_path):
    source = write_sciknoweval_layout(tmp_path / "sciknoweval")
    storage = (tmp_path / "store").resolve()
    done = run_dcv(
        "run",
        str(PAPER_CONFIG),
        *sum((["--set", o] for o in toy_overrides(source, storage)), []),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    checkpoints = pl.read_parquet(results_dir(storage) / "checkpoints.parquet")
    assert set(checkpoints["method"]) == {"sft", "rl"}
    effects = pl.read_parquet(patching_dir(storage) / "effects.parquet")
    assert set(effects["method"]) == {"exact", "attribution", "mask"}
    assert "chem" in set(effects["probe"])
    assert effects["effect"].is_finite().all()
    cmap = pl.read_parquet(patching_dir(storage) / "cmap.parquet")  # cross-model patching, checkpoints only
    assert set(cmap["direction"]) == {"ckpt_into_base", "base_into_ckpt"} and "base" not in set(cmap["model"])
    assert cmap["effect"].is_finite().all()
    assert not pl.read_parquet(analysis_dir(storage) / "cmap.parquet").is_empty()
    report = next(storage.rglob("report.md")).read_text()
    assert "Cross-model activation patching (cmap)" in report
    circuits = pl.read_parquet(circuits_dir(storage) / "circuits.parquet")
    assert "mask" in set(circuits["method"])
    curves = pl.read_parquet(circuits_dir(storage) / "faithfulness_curves.parquet")  # ranking methods only
    assert set(curves["method"]) == {"exact", "attribution"} and curves["faithfulness"].is_finite().all()
    assert not pl.read_parquet(analysis_dir(storage) / "faithfulness_areas.parquet").is_empty()
    assert any(benchmarks_dir(storage).rglob("*.parquet"))
    assert any(calibration_dir(storage).rglob("*.parquet"))
    assert any(analysis_dir(storage).glob("*.parquet"))
    changed = pl.read_parquet(weight_change_dir(storage) / WEIGHT_CHANGE_FILE)
    assert changed.height == 2 * 8 * checkpoints.filter(pl.col("step") > 0).height  # layers x heads each
    print(done.stdout)  # the stage lines (pytest -rP shows them)
    first_checkpoint = next((storage / "trials").rglob("config.json"))
    assert json.loads(first_checkpoint.read_text())["model_type"] == "qwen2"
