"""Standard retention benchmarks: lm-eval-harness scores of every model the experiment produced.

Forgetting shows up first on broad benchmarks (HellaSwag, WinoGrande, TruthfulQA, MMLU), so every model of
the results table is scored with ``lm_eval.simple_evaluate`` on its HF checkpoint folder. Metrics are
named ``bench/<task>/<metric>`` (``acc``, ``acc_norm`` where the task has it; TruthfulQA MC2's is
``acc``, the probability mass on the true answers), without stderr and without lm-eval's ``,none``
filter suffix.

Task names are lm-eval's (hub datasets, downloaded at run time) or come from ``benchmarks.include_path``,
a folder of task YAMLs over local files (``configs/benchmarks/``). Local data paths: lm-eval hands
``dataset_kwargs`` to ``datasets.load_dataset("json", data_files=...)`` unchanged, and ``datasets``
resolves a relative ``data_files`` path against the *current working directory*, which differs between
the shell, pytest and Ray workers. So dcv reads each local task YAML with lm-eval's own loader, makes its
relative ``data_files`` absolute against the YAML's folder, and gives lm-eval that config dict instead of
the task's name. (Consequence: list local tasks by name; a local *group* would load its tasks' files
relative to the working directory, so ``check_benchmarks`` refuses it.)

``check_benchmarks`` runs before any model is loaded: unknown names (with close matches), local files that
are missing, not JSON lines, or whose rows lack the benchmark's fields (a local YAML names its row schema
as ``metadata.dcv_row_schema``; see ROW_CHECKS), and code-executing tasks without
``allow_code_execution``.

The stage (``run_benchmark_stage``) is one item per model on the stage runner (``dcv.stages``): the base
model once (every trial's step 0 from "base"), then each checkpoint. One file per model,
``<storage>/benchmarks/models/<model>__<hash>.parquet`` (SCORES_SCHEMA rows), written atomically; the hash
covers the checkpoint folder, the benchmark config, lm-eval's version and the local task files, so a rerun
skips finished models.
The long table is ``<storage>/benchmarks/benchmarks.parquet``; ``join_benchmarks`` widens it onto the
results table.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import polars as pl

from dcv.config import BenchmarksConfig, ConfigError, ExperimentConfig
from dcv.results import MODELS_SCHEMA, list_models
from dcv.storage import (
    BASE_MODEL,
    BENCHMARKS_FILE,
    atomic_path,
    benchmarks_dir,
    checkpoint_model,
    content_hash,
    file_slug,
    local_model_folder,
    write_parquet,
)

METRIC_PREFIX = "bench"
SCORES_SCHEMA = {
    "model": pl.String,
    "trial": pl.String,  # "base" for the base model, which stands for every trial's step 0
    "step": pl.Int64,
    "metric": pl.String,  # bench/<task>/<metric>
    "value": pl.Float64,
}
MAX_PROBLEMS_PER_FILE = 5  # a wholly wrong file would otherwise bury the other errors


# ---------------------------------------------------------------- local rows, in each benchmark's schema


def _missing(row: dict, fields: tuple[str, ...]) -> str | None:
    absent = [f for f in fields if f not in row]
    return f"missing field(s) {absent}" if absent else None


def _string_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def check_hellaswag_row(row: dict) -> str | None:
    """Rowan/hellaswag: lm-eval's process_docs joins activity_label, ctx_a, ctx_b; label indexes endings."""
    if problem := _missing(row, ("activity_label", "ctx_a", "ctx_b", "endings", "label")):
        return problem
    if not _string_list(row["endings"]):
        return "endings must be a non-empty list of strings"
    if str(row["label"]) not in {str(i) for i in range(len(row["endings"]))}:
        return f"label={row['label']!r} must index endings (0..{len(row['endings']) - 1})"
    return None


def check_winogrande_row(row: dict) -> str | None:
    """allenai/winogrande: one "_" in sentence; answer is the string "1" or "2" (lm-eval maps strings)."""
    if problem := _missing(row, ("sentence", "option1", "option2", "answer")):
        return problem
    if not isinstance(row["sentence"], str) or row["sentence"].count("_") != 1:
        return "sentence must be a string with exactly one '_' (the blank the options fill)"
    if row["answer"] not in ("1", "2"):
        return f"answer={row['answer']!r} must be the string '1' or '2'"
    return None


def check_truthfulqa_mc2_row(row: dict) -> str | None:
    """truthfulqa/truthful_qa (multiple_choice): mc2_targets {choices, labels}, at least one true label."""
    if problem := _missing(row, ("question", "mc2_targets")):
        return problem
    targets = row["mc2_targets"]
    if not isinstance(targets, dict) or (problem := _missing(targets, ("choices", "labels"))):
        return "mc2_targets must be {choices: [...], labels: [...]}"
    choices, labels = targets["choices"], targets["labels"]
    if not _string_list(choices) or not isinstance(labels, list) or len(labels) != len(choices):
        return "mc2_targets.choices must be strings, with one label per choice"
    if any(label not in (0, 1) for label in labels) or 1 not in labels:
        return f"mc2_targets.labels={labels} must be 0/1 with at least one 1 (a true answer)"
    return None


def check_mmlu_row(row: dict) -> str | None:
    """cais/mmlu: the prompt template reads choices[0..3]; answer is the index of the right one."""
    if problem := _missing(row, ("question", "choices", "answer")):
        return problem
    if not _string_list(row["choices"]) or len(row["choices"]) != 4:
        return "choices must be a list of 4 strings"
    answer = row["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer <= 3:
        return f"answer={answer!r} must be an integer 0..3"
    return None


# metadata.dcv_row_schema of a local task YAML -> the check of one row.
ROW_CHECKS: dict[str, Callable[[dict], str | None]] = {
    "hellaswag": check_hellaswag_row,
    "winogrande": check_winogrande_row,
    "truthfulqa_mc2": check_truthfulqa_mc2_row,
    "mmlu": check_mmlu_row,
}


def read_json_rows(path: Path) -> tuple[list[tuple[int, Any]], list[str]]:
    """(row number, value) pairs of a JSON-lines file (or a .json array), and the rows that do not parse."""
    text = path.read_text()
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            return list(enumerate(json.loads(text), start=1)), []
        except json.JSONDecodeError as exc:
            return [], [f"not valid JSON ({exc})"]
    rows, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            problems.append(f"row {number}: not valid JSON ({exc.msg} at column {exc.colno})")
    return rows, problems


def check_data_file(path: Path, schema: str | None) -> list[str]:
    """Problems of one local data file, each naming the row; [] when every row fits ``schema``."""
    if not path.is_file():
        return [f"{path}: no such file"]
    if path.suffix not in (".jsonl", ".json"):
        return []  # csv/parquet: lm-eval's loader reports those itself
    rows, problems = read_json_rows(path)
    check = ROW_CHECKS.get(schema) if schema else None
    for number, row in rows:
        if not isinstance(row, dict):
            problems.append(f"row {number}: not a JSON object")
        elif check and (problem := check(row)):
            problems.append(f"row {number}: {problem}")
    if not rows and not problems:
        problems.append("no rows")
    if len(problems) > MAX_PROBLEMS_PER_FILE:
        hidden = len(problems) - MAX_PROBLEMS_PER_FILE
        problems = [*problems[:MAX_PROBLEMS_PER_FILE], f"... and {hidden} more"]
    return [f"{path} {p}" for p in problems]


# ---------------------------------------------------------------- task lookup


def resolve_data_files(data_files: Any, folder: Path) -> Any:
    """``data_files`` (a path, a list, or {split: path or list}) with relative paths made absolute."""
    if isinstance(data_files, str):
        absolute = "://" in data_files or Path(data_files).expanduser().is_absolute()
        return str(Path(data_files).expanduser()) if absolute else str(folder / data_files)
    if isinstance(data_files, list):
        return [resolve_data_files(p, folder) for p in data_files]
    if isinstance(data_files, dict):
        return {split: resolve_data_files(p, folder) for split, p in data_files.items()}
    return data_files


def data_file_paths(data_files: Any) -> list[Path]:
    """Every local file named in resolved ``data_files`` (remote URLs are not checked)."""
    if isinstance(data_files, str):
        return [] if "://" in data_files else [Path(data_files)]
    values = data_files.values() if isinstance(data_files, dict) else data_files
    return [path for value in values for path in data_file_paths(value)]


def local_task_index(include_path: str | None) -> dict:
    """{name: lm-eval index Entry} of the YAMLs under ``include_path`` (milliseconds: only that folder)."""
    if include_path is None:
        return {}
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=False).task_index


def default_task_names() -> frozenset[str]:
    """Every task, group and tag name lm-eval ships, cached per lm-eval version.

    Indexing lm-eval's ~14,700 task YAMLs takes 12-14 s on a 2-core machine (measured); the names only
    change with the lm-eval version, so the list is kept in ``<dcv cache>/lm_eval/<version>-task-names.json``.
    """
    from dcv.storage import cache_dir

    path = cache_dir() / "lm_eval" / f"{version('lm_eval')}-task-names.json"
    try:
        return frozenset(json.loads(path.read_text()))
    except (OSError, ValueError):
        pass
    from lm_eval.tasks import TaskManager

    names = TaskManager().all_tasks
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(sorted(names)))
    return frozenset(names)


def local_task_config(entry) -> dict[str, Any]:
    """A local task's full config (includes merged, functions imported), its data_files made absolute."""
    # lm-eval's own YAML loader (lm-eval is pinned): it resolves `include:` and `!function` as lm-eval does.
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(entry.yaml_path)
    config = load_yaml(path, resolve_func=True)
    kwargs = dict(config.get("dataset_kwargs") or {})
    if "data_files" in kwargs:
        kwargs["data_files"] = resolve_data_files(kwargs["data_files"], path.parent)
        config["dataset_kwargs"] = kwargs
    return config


def check_local_task(label: str, entry, allow_code_execution: bool) -> list[str]:
    """Problems of one task from include_path: its kind, its code execution, its data files and rows."""
    from lm_eval.tasks._index import Kind

    if entry.kind not in (Kind.TASK, Kind.PY_TASK):
        return [
            f"[benchmarks] {label}: is a local {entry.kind.name.lower()}; list its tasks instead, so that "
            "dcv can resolve each task's data_files against its YAML's folder"
        ]
    raw = entry.cfg or {}
    problems = []
    if raw.get("unsafe_code") and not allow_code_execution:
        problems.append(
            f"[benchmarks] {label}: {entry.yaml_path} sets unsafe_code (it executes model-written code); "
            "set benchmarks.allow_code_execution: true to run it"
        )
    schema = (raw.get("metadata") or {}).get("dcv_row_schema")
    if schema is not None and schema not in ROW_CHECKS:
        problems.append(
            f"[benchmarks] {label}: {entry.yaml_path} metadata.dcv_row_schema={schema!r} is unknown; "
            f"valid: {sorted(ROW_CHECKS)}"
        )
        schema = None
    data_files = resolve_data_files(
        (raw.get("dataset_kwargs") or {}).get("data_files"), Path(entry.yaml_path).parent
    )
    for path in data_file_paths(data_files) if data_files else []:
        problems += [f"[benchmarks] {label}: {p}" for p in check_data_file(path, schema)]
    return problems


def check_benchmarks(cfg: BenchmarksConfig) -> None:
    """Raise one ConfigError listing every problem of ``cfg``'s tasks; loads no model.

    Only lm-eval's task index is read: the include_path folder always (milliseconds), lm-eval's own names
    when a task is not local (cached, see ``default_task_names``).
    """
    if not cfg.tasks:
        return
    local = local_task_index(cfg.include_path)
    problems: list[str] = []
    for i, name in enumerate(cfg.tasks):
        label = f"tasks[{i}]={name!r}"
        if name in local:
            problems += check_local_task(label, local[name], cfg.allow_code_execution)
            continue
        known = default_task_names()
        if name not in known:
            close = difflib.get_close_matches(name, [*local, *known], n=5, cutoff=0.6)
            where = f" nor in include_path={cfg.include_path}" if cfg.include_path else ""
            hint = f"close matches: {', '.join(close)}" if close else "no close match"
            problems.append(
                f"[benchmarks] {label}: not an lm-eval {version('lm_eval')} task, group or tag{where}; {hint}"
            )
    if problems:
        raise ConfigError(problems)


# ---------------------------------------------------------------- one model


def flatten_results(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's ``results`` as {"bench/<task>/<metric>": value}: stderr dropped, ",none" dropped, other
    filters kept as a suffix (``bench/gsm8k/exact_match/strict-match``)."""
    flat = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr") or isinstance(value, bool):
                continue  # "alias", "name", "sample_len" carry no filter; they are not scores
            if not isinstance(value, int | float):
                continue  # lm-eval writes "N/A" where a metric has no value
            suffix = "" if filter_name == "none" else f"/{filter_name}"
            flat[f"{METRIC_PREFIX}/{task}/{metric}{suffix}"] = float(value)
    return flat


def warn_code_execution(tasks: list[str]) -> None:
    """Say loudly that model-written code will run here, and set what lm-eval's code metrics require."""
    print(
        f"WARNING benchmarks: allow_code_execution is true: tasks {tasks} may EXECUTE MODEL-WRITTEN CODE "
        "on this machine, with this process's permissions"
    )
    # HF `evaluate`'s code_eval metric (humaneval, mbpp) refuses to run without this variable.
    os.environ["HF_ALLOW_CODE_EVAL"] = "1"


def build_task_specs(cfg: BenchmarksConfig) -> tuple[list[str | dict], Any]:
    """What ``simple_evaluate`` gets: local tasks as config dicts (absolute data paths), others by name,
    and a TaskManager that indexes lm-eval's own 14,700 YAMLs only when a task needs them (14 s)."""
    from lm_eval.tasks import TaskManager

    local = local_task_index(cfg.include_path)
    specs = [local_task_config(local[name]) if name in local else name for name in cfg.tasks]
    needs_defaults = any(isinstance(spec, str) for spec in specs)
    return specs, TaskManager(include_path=cfg.include_path, include_defaults=needs_defaults)


def run_benchmarks(model_dir: Path, cfg: BenchmarksConfig, device: str = "cpu") -> dict[str, float]:
    """``cfg.tasks`` on the HF model folder ``model_dir``: {"bench/<task>/<metric>": value}.

    The tasks are checked first (``check_benchmarks``), so a bad task or file fails before the model loads.
    """
    if not cfg.tasks:
        return {}
    check_benchmarks(cfg)
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not an HF model folder (no config.json)")
    import lm_eval

    if cfg.allow_code_execution:
        warn_code_execution(cfg.tasks)
    specs, manager = build_task_specs(cfg)
    start = time.monotonic()
    output = lm_eval.simple_evaluate(
        model="hf",
        # float32 on CPU (half precision is slow and inexact there); on GPU the checkpoint's own dtype.
        model_args={"pretrained": str(model_dir), "dtype": "float32" if device == "cpu" else "auto"},
        tasks=specs,
        task_manager=manager,
        num_fewshot=cfg.num_fewshot,
        batch_size=cfg.batch_size,
        device=device,
        limit=cfg.limit,
        log_samples=False,
        confirm_run_unsafe_code=cfg.allow_code_execution,
    )
    scores = flatten_results(output["results"])
    for task, counts in sorted(output["n-samples"].items()):
        shown = "  ".join(
            f"{name.split('/', 2)[2]}={value:.3f}"
            for name, value in scores.items()
            if name.startswith(f"{METRIC_PREFIX}/{task}/")
        )
        print(f"benchmarks: {model_dir.name}: {task}: {shown} ({counts['effective']} rows)")
    print(f"benchmarks: {model_dir.name}: {len(cfg.tasks)} task(s) in {time.monotonic() - start:.1f} s")
    return scores


# ---------------------------------------------------------------- the stage


def list_benchmark_models(cfg: ExperimentConfig, results: pl.DataFrame) -> pl.DataFrame:
    """(model, trial, step, checkpoint) of every distinct model of a results table (``list_models``: a
    missing folder is an error naming its row). lm-eval loads folders, so the base model is read from a
    trial's step-0 folder from "base" (the same weights) when the config names a built-in model."""
    models = list_models(cfg, results)
    base_rows = results.filter((pl.col("step") == 0) & (pl.col("init") == "base"))
    if base_rows.is_empty():
        return models
    folder = pl.lit(base_rows["checkpoint"][0])
    checkpoint = pl.when(pl.col("model") == BASE_MODEL).then(folder).otherwise(pl.col("checkpoint"))
    return models.with_columns(checkpoint.alias("checkpoint"))


def local_files_digest(include_path: str | None) -> str | None:
    """A hash of every file under include_path: edited local rows or YAMLs must recompute the scores."""
    if include_path is None:
        return None
    digest = hashlib.sha256()
    root = Path(include_path)
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def benchmark_file(cfg: BenchmarksConfig, storage_root: Path, model: str, checkpoint: str) -> Path:
    """``<storage>/benchmarks/models/<model>__<hash>.parquet``; the hash covers everything that changes
    the scores."""
    decides = {
        "checkpoint": str(checkpoint),
        "benchmarks": cfg.model_dump(mode="json", exclude={"num_cpus"}),  # num_gpus picks the dtype
        "lm_eval": version("lm_eval"),
        "local_files": local_files_digest(cfg.include_path),
    }
    return benchmarks_dir(storage_root) / "models" / f"{file_slug(model)}__{content_hash(decides)}.parquet"


def benchmark_item(worker, item: dict, context: None) -> pl.DataFrame:
    """The stage's compute (``dcv.stages``): one model's scores, SCORES_SCHEMA rows. lm-eval loads the
    checkpoint folder itself, so the actor's model cache is not used."""
    scores = run_benchmarks(local_model_folder(item["checkpoint"]), worker.cfg.benchmarks, worker.device)
    rows = [
        {"model": item["model"], "trial": item["trial"], "step": item["step"], "metric": m, "value": v}
        for m, v in scores.items()
    ]
    return pl.DataFrame(rows, schema=SCORES_SCHEMA)


def run_benchmark_stage(
    cfg: ExperimentConfig,
    results: pl.DataFrame,
    storage_root: Path,
    progress: Callable[[str], None] = print,
) -> pl.DataFrame:
    """Every model's benchmark scores (SCORES_SCHEMA) on the stage runner, as many models at a time as
    the cluster's CPUs allow; needs Ray. Writes ``<storage>/benchmarks/benchmarks.parquet``. No tasks
    configured: an empty table."""
    bench = cfg.benchmarks
    if not bench.tasks:
        return pl.DataFrame(schema=SCORES_SCHEMA)
    check_benchmarks(bench)
    import ray

    from dcv.stages import WORK_COLUMNS, Resources, Stage, run_stage

    models = list_benchmark_models(cfg, results)
    rows = []
    for model, trial, step, checkpoint in models.iter_rows():
        path = benchmark_file(bench, storage_root, model, checkpoint)
        rows.append(
            {
                "item_id": path.stem,
                "path": str(path),
                "n_rows": None,
                "model": model,
                "trial": trial,
                "step": step,
                "checkpoint": checkpoint,
            }
        )
    work = pl.DataFrame(rows, schema={**WORK_COLUMNS, **MODELS_SCHEMA})
    actors = max(1, int(ray.cluster_resources().get("CPU", 1) // max(bench.num_cpus, 1e-9)))
    fields = ("the cluster's CPUs / benchmarks.num_cpus", "benchmarks.num_cpus", "benchmarks.num_gpus")
    resources = Resources(actors, bench.num_cpus, bench.num_gpus, fields)
    run = run_stage(Stage("benchmarks", cfg, work, SCORES_SCHEMA, benchmark_item, resources), progress)
    table = run.table.sort("model", "metric")
    write_parquet(table, benchmarks_dir(storage_root) / BENCHMARKS_FILE)
    return table


def join_benchmarks(results: pl.DataFrame, scores: pl.DataFrame) -> pl.DataFrame:
    """``results`` with one f64 column per ``bench/<task>/<metric>``, each row getting its model's scores
    (step-0 rows from "base" get the base model's). Earlier bench/ columns are replaced; row order kept."""
    kept = results.drop([c for c in results.columns if c.startswith(f"{METRIC_PREFIX}/")])
    if scores.is_empty():
        return kept
    wide = scores.pivot(on="metric", index="model", values="value")
    wide = wide.select("model", *sorted(c for c in wide.columns if c != "model"))
    models = [checkpoint_model(t, s, i) for t, s, i in kept.select("trial", "step", "init").iter_rows()]
    keyed = kept.with_columns(pl.Series("_model", models, dtype=pl.String))
    joined = keyed.join(wide, left_on="_model", right_on="model", how="left", maintain_order="left")
    return joined.drop("_model")
