"""Retention benchmarks through lm-eval on the shipped local files: metric names and ranges, errors that
name the file and row before any model loads, code-execution opt-in, and a cached per-model Ray stage."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import polars as pl
import pytest

from dcv.benchmarks import (
    SCORES_SCHEMA,
    benchmarks_dir,
    check_benchmarks,
    flatten_results,
    join_benchmarks,
    list_benchmark_models,
    local_task_config,
    local_task_index,
    run_benchmark_stage,
    run_benchmarks,
    warn_code_execution,
)
from dcv.config import BenchmarksConfig, ConfigError, parse_config
from dcv.models import save_model
from tests.helpers import REPO, results_of, tiny_config_dict

LOCAL = REPO / "configs" / "benchmarks"
LOCAL_TASKS = ["dcv_hellaswag", "dcv_winogrande", "dcv_truthfulqa_mc2", "dcv_mmlu"]
EXPECTED_METRICS = {
    "bench/dcv_hellaswag/acc",
    "bench/dcv_hellaswag/acc_norm",
    "bench/dcv_winogrande/acc",
    "bench/dcv_truthfulqa_mc2/acc",
    "bench/dcv_mmlu/acc",
}


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_model, tokenizer, tmp_path_factory) -> Path:
    """The tiny random model as an HF folder: lm-eval's scores are chance-level, their shape is the point."""
    return save_model(tiny_model, tokenizer, tmp_path_factory.mktemp("tiny") / "model")


def local_copy(tmp_path: Path) -> Path:
    """The shipped task folder, copied so that a test can break one file."""
    return Path(shutil.copytree(LOCAL, tmp_path / "benchmarks", ignore=shutil.ignore_patterns("__pycache__")))


def edit_row(path: Path, number: int, edit) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = edit(lines[number - 1])
    path.write_text("\n".join(lines) + "\n")


def test_shipped_local_benchmarks_are_valid_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # datasets would resolve relative data_files here
    check_benchmarks(BenchmarksConfig(tasks=LOCAL_TASKS, include_path=str(LOCAL)))
    for name in LOCAL_TASKS:
        files = local_task_config(local_task_index(str(LOCAL))[name])["dataset_kwargs"]["data_files"]
        assert all(Path(p).is_absolute() and Path(p).is_file() for p in files.values())


def test_run_benchmarks_gives_every_task_metric_in_unit_range(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = BenchmarksConfig(tasks=LOCAL_TASKS, include_path=str(LOCAL), limit=3, batch_size=16)
    scores = run_benchmarks(tiny_model_dir, cfg)
    assert set(scores) == EXPECTED_METRICS
    assert all(0.0 <= value <= 1.0 for value in scores.values())
    assert "dcv_hellaswag: acc=" in capsys.readouterr().out


def test_bad_json_row_is_named_before_any_model_loads(tmp_path):
    folder = local_copy(tmp_path)
    edit_row(folder / "hellaswag.jsonl", 3, lambda line: line[:40])
    cfg = BenchmarksConfig(tasks=["dcv_hellaswag"], include_path=str(folder))
    # A model folder that does not exist: a load would fail with FileNotFoundError, not ConfigError.
    with pytest.raises(ConfigError, match=r"hellaswag\.jsonl row 3: not valid JSON"):
        run_benchmarks(tmp_path / "no-model-here", cfg)


def test_row_missing_a_field_is_named_with_file_and_row(tmp_path):
    folder = local_copy(tmp_path)

    def drop_endings(line: str) -> str:
        row = json.loads(line)
        del row["endings"]
        return json.dumps(row)

    edit_row(folder / "hellaswag.jsonl", 2, drop_endings)
    edit_row(folder / "winogrande.jsonl", 5, lambda line: line.replace('"answer": "2"', '"answer": 2'))
    cfg = BenchmarksConfig(tasks=["dcv_hellaswag", "dcv_winogrande"], include_path=str(folder))
    with pytest.raises(ConfigError) as error:
        run_benchmarks(tmp_path / "no-model-here", cfg)
    message = str(error.value)
    assert "hellaswag.jsonl row 2: missing field(s) ['endings']" in message
    assert "winogrande.jsonl row 5: answer=2 must be the string '1' or '2'" in message


def test_missing_data_file_is_an_error(tmp_path):
    folder = local_copy(tmp_path)
    (folder / "mmlu.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"mmlu\.jsonl: no such file"):
        check_benchmarks(BenchmarksConfig(tasks=["dcv_mmlu"], include_path=str(folder)))


def test_unknown_task_lists_close_matches(tmp_path):
    cfg = BenchmarksConfig(tasks=["dcv_helaswag", "dcv_mmlu"], include_path=str(LOCAL))
    with pytest.raises(ConfigError, match=r"tasks\[0\]='dcv_helaswag'.*close matches: dcv_hellaswag"):
        run_benchmarks(tmp_path / "no-model-here", cfg)


def test_code_executing_task_needs_the_flag(tmp_path, monkeypatch, capsys):
    raw = tiny_config_dict(tmp_path)
    raw["benchmarks"] = {"tasks": ["mbpp", "humaneval_plus"]}
    with pytest.raises(
        ConfigError, match=r"benchmarks\.tasks: \['mbpp', 'humaneval_plus'\].*allow_code_exec"
    ):
        parse_config(raw)
    raw["benchmarks"]["allow_code_execution"] = True
    assert parse_config(raw).benchmarks.allow_code_execution

    # A local YAML that lm-eval would run as unsafe code is caught too.
    folder = local_copy(tmp_path)
    path = folder / "dcv_mmlu.yaml"
    path.write_text(path.read_text() + "unsafe_code: true\n")
    with pytest.raises(ConfigError, match="sets unsafe_code"):
        check_benchmarks(BenchmarksConfig(tasks=["dcv_mmlu"], include_path=str(folder)))

    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    warn_code_execution(["mbpp"])
    assert "WARNING benchmarks: allow_code_execution is true" in capsys.readouterr().out
    assert os.environ["HF_ALLOW_CODE_EVAL"] == "1"


def test_flatten_results_drops_stderr_and_the_none_filter():
    results = {
        "dcv_hellaswag": {
            "alias": "dcv_hellaswag",
            "sample_len": 20,
            "acc,none": 0.5,
            "acc_stderr,none": 0.1,
        },
        "gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": "N/A"},
    }
    assert flatten_results(results) == {
        "bench/dcv_hellaswag/acc": 0.5,
        "bench/gsm8k/exact_match/strict-match": 0.25,
    }


def test_join_gives_every_row_its_models_scores():
    results = results_of({("sft-a", 0): Path("/a0"), ("sft-a", 4): Path("/a4"), ("rl-b", 0): Path("/b0")})
    scores = pl.DataFrame(
        [
            {"model": "base", "trial": "base", "step": 0, "metric": "bench/t/acc", "value": 0.5},
            {"model": "sft-a@4", "trial": "sft-a", "step": 4, "metric": "bench/t/acc", "value": 0.25},
        ],
        schema=SCORES_SCHEMA,
    )
    joined = join_benchmarks(results, scores)
    assert joined.select("trial", "step").rows() == results.select("trial", "step").rows()
    by_row = {f"{t}@{step}": v for t, step, v in joined.select("trial", "step", "bench/t/acc").iter_rows()}
    assert by_row == {"rl-b@0": 0.5, "sft-a@0": 0.5, "sft-a@4": 0.25}
    assert join_benchmarks(joined, scores).columns == joined.columns  # a rejoin replaces, never duplicates


def test_a_missing_checkpoint_folder_names_its_row(tmp_path):
    cfg = parse_config(tiny_config_dict(tmp_path / "storage"))
    with pytest.raises(FileNotFoundError, match=r"trial='sft-a' step=4"):
        list_benchmark_models(cfg, results_of({("sft-a", 4): tmp_path / "gone"}))


def test_stage_runs_each_model_once_and_a_rerun_computes_nothing(ray_cluster, tiny_model_dir, tmp_path):
    checkpoints = {("sft-a", 0): tiny_model_dir, ("sft-a", 4): tiny_model_dir, ("rl-b", 0): tiny_model_dir}
    results = results_of(checkpoints)
    raw = tiny_config_dict(tmp_path / "storage")
    raw["benchmarks"] = {
        "tasks": ["dcv_winogrande", "dcv_mmlu"],
        "include_path": str(LOCAL),
        "limit": 2,
        "num_cpus": 1,
    }
    cfg = parse_config(raw)
    storage = Path(cfg.storage.root)
    messages: list[str] = []

    table = run_benchmark_stage(cfg, results, storage, progress=messages.append)
    files = sorted((benchmarks_dir(storage) / "models").glob("*.parquet"))
    assert [f.name.split("__")[0] for f in files] == ["base", "sft-a_4"]  # two step-0 rows, one base model
    assert set(table["model"]) == {"base", "sft-a@4"}
    assert set(table["metric"]) == {"bench/dcv_winogrande/acc", "bench/dcv_mmlu/acc"}
    assert pl.read_parquet(benchmarks_dir(storage) / "benchmarks.parquet").equals(table)

    mtimes = [f.stat().st_mtime_ns for f in files]
    again = run_benchmark_stage(cfg, results, storage, progress=messages.append)
    assert "2 finished before (skipped), 0 to compute" in messages[-1]
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert again.equals(table)

    joined = join_benchmarks(results, table)
    assert joined.filter(pl.col("step") == 0)["bench/dcv_mmlu/acc"].n_unique() == 1


def test_no_tasks_means_no_stage(tmp_path):
    cfg = parse_config(tiny_config_dict(tmp_path))
    table = run_benchmark_stage(cfg, results_of({}), tmp_path)
    assert table.is_empty() and not benchmarks_dir(tmp_path).exists()
