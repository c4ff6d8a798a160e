"""Checkpoints written by a plain TRL script (no dcv, no Ray) on the tiny model, measured by `dcv run`'s
stages through the external source under two labels of the user's (sft vs distill); rerunning computes
nothing, and a checkpoint added to the config computes only its own items."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest

from dcv.config import parse_config
from dcv.experiment import prepare_base, run_experiment
from dcv.external import run_external
from dcv.results import read_results
from dcv.storage import storage_root
from tests.helpers import tiny_run_config_dict

pytestmark = [pytest.mark.ray]

# A plain TRL SFT run: the user's own script, nothing of dcv. It saves an HF checkpoint every step.
TRL_SCRIPT = textwrap.dedent(
    """
    import sys
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    base, runs = sys.argv[1], sys.argv[2:]
    rows = [
        {"prompt": [{"role": "user", "content": f"What is the symbol of element {i}?"}],
         "completion": [{"role": "assistant", "content": f"<answer>{chr(65 + i % 4)}</answer>"}]}
        for i in range(8)
    ]
    for out, lr in zip(runs[::2], runs[1::2]):  # (output folder, learning rate) per run
        model = AutoModelForCausalLM.from_pretrained(base)
        tokenizer = AutoTokenizer.from_pretrained(base)
        args = SFTConfig(
            output_dir=out, max_steps=3, save_steps=1, learning_rate=float(lr), per_device_train_batch_size=2,
            report_to="none", use_cpu=True, seed=0, logging_steps=1, lr_scheduler_type="constant",
        )
        data = Dataset.from_list(rows)
        SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer).train()
    """
)


@pytest.fixture(scope="module")
def trl_checkpoints(tmp_path_factory, tiny_model, tokenizer) -> tuple[Path, dict[str, Path]]:
    """(the base folder, {run: its TRL output folder}): two runs at two learning rates, one after the other
    in one process of the script."""
    root = tmp_path_factory.mktemp("trl")
    base = root / "base"
    tiny_model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    script = root / "train.py"
    script.write_text(TRL_SCRIPT)
    runs = {"plain-sft": (root / "sft", "1e-3"), "distilled": (root / "distill", "3e-3")}
    arguments = [str(part) for out, lr in runs.values() for part in (out, lr)]
    done = subprocess.run(
        [sys.executable, str(script), str(base), *arguments], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return base, {name: out for name, (out, _) in runs.items()}


def external_config(storage: Path, base: Path, runs: dict[str, Path], steps: list[int]):
    raw = tiny_run_config_dict(storage)
    raw.pop("benchmarks")
    raw["name"] = "trl-external"
    raw["tracking"] = {"experiment_name": "trl-external"}
    raw["model"] = {"name": str(base)}
    labels = {"plain-sft": "sft", "distilled": "distill"}
    raw["external"] = {
        "runs": [
            {
                "run": name,
                "method": labels[name],
                "checkpoints": [{"step": s, "path": str(out / f"checkpoint-{s}")} for s in steps],
            }
            for name, out in runs.items()
        ]
    }
    raw["comparison"] = {"methods": ["sft", "distill"]}
    return parse_config(raw)


def test_trl_checkpoints_measured_under_their_labels_and_resumed(trl_checkpoints, ray_cluster, tmp_path):
    base, runs = trl_checkpoints
    storage = tmp_path / "store"
    lines: list[str] = []
    cfg = external_config(storage, base, runs, [1, 2])
    run = run_experiment(cfg, progress=lambda line: None, stage_line=lines.append)

    results = read_results(storage)
    assert results.select("trial", "method", "step").rows() == [
        ("distilled", "distill", 0),
        ("distilled", "distill", 1),
        ("distilled", "distill", 2),
        ("plain-sft", "sft", 0),
        ("plain-sft", "sft", 1),
        ("plain-sft", "sft", 2),
    ]
    # Step 0 of both runs is the base snapshot: one model, patched once.
    assert set(results.filter(pl.col("step") == 0)["checkpoint"]) == {str(storage_root(cfg) / "base")}
    assert results["kl_to_base"].drop_nulls().len() == 6
    assert results.filter(pl.col("step") == 0)["kl_to_base"].abs().max() < 1e-6
    assert results.filter(pl.col("step") == 2)["kl_to_base"].min() > 0  # training moved the weights
    # The same evaluation a trial runs (EvaluationKit.evaluate), here in this process on one checkpoint.
    from dcv.models import load_model, load_tokenizer
    from dcv.training.checkpoints import EvaluationKit

    based = prepare_base(cfg, storage_root(cfg))
    kit = EvaluationKit.build(based, load_tokenizer(based.model))
    folder = str(runs["distilled"] / "checkpoint-2")
    direct = kit.evaluate(load_model(based.model.model_copy(update={"name": folder})))
    row = results.filter(pl.col("checkpoint") == folder).row(0, named=True)
    for key, value in direct.metrics.items():
        assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # The report and MLflow say which labels were compared.
    report = run.report_md.read_text()
    assert "1 SFT and 1 DISTILL runs (trained elsewhere" in report
    assert "compared: sft vs distill" in report
    done = "\n".join(line for line in lines if "] done" in line)
    assert "external runs, 6 checkpoints (5 evaluated, 0 skipped)" in done, done
    patched = int(re.search(r"patching\] done in \d+ s: (\d+) items computed, 0 skipped", done).group(1))

    # Rerun: nothing new is computed.
    again = run_external(based)
    assert (again.stage.computed, again.stage.skipped) == (0, 5)
    # A third checkpoint of one run: only its item is evaluated, patched, and its circuits found.
    lines.clear()
    cfg = external_config(storage, base, runs, [1, 2])
    raw = cfg.model_dump(mode="json")
    raw["external"]["runs"][0]["checkpoints"].append(
        {"step": 3, "path": str(runs["plain-sft"] / "checkpoint-3")}
    )
    run_experiment(parse_config(raw), progress=lambda line: None, stage_line=lines.append)
    done = "\n".join(line for line in lines if "] done" in line)
    assert "external runs, 7 checkpoints (1 evaluated, 5 skipped)" in done, done
    # Five models were patched before (the base and four checkpoints): the new one's share of items.
    assert f": {patched // 5} items computed, {patched} skipped" in done, done
