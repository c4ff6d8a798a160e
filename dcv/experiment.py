"""The whole experiment in one call: base snapshot -> sweep -> benchmarks -> patching -> circuits ->
weight change -> calibration -> analysis -> report.

Every stage resumes: the base snapshot is written once; the sweep skips finished trials (and restores
Tune's state for unfinished ones); the patching pipeline, the circuits and the weight-change stages skip
finished items and models; the analysis and the report are cheap and always rebuilt from the stored
tables. Storage layout (under ``storage.root``):

    experiment_config.json   the config this run uses (the base model named by its snapshot folder)
    base/                    the base model as an HF folder (what every stage loads as the base)
    trials/, sweeps/         the sweep (dcv.training.sweep); results/checkpoints.parquet its table
    benchmarks/              lm-eval scores per model (dcv.benchmarks), joined into the results table
    patching/                head effects (dcv.circuits.pipeline)
    circuits/                every model's circuits (dcv.circuits.model_circuits)
    weight_change/           per-head weight change of every checkpoint (dcv.circuits.weight_change)
    analysis/                the analysis tables (dcv.analysis), parquet and CSV
    report/                  report.md, report.html, figures/*.png
    stage_seconds.json       wall time of each stage in its last run

``run_experiment`` first runs ``preflight``: every check that can fail on bad input (the sweep's plan,
the benchmarks, the tracking server), so a mistake fails in seconds, before Ray starts or anything is
written. It needs a connected Ray and never starts one itself: ``connect`` runs after the checks (``dcv
run`` and ``ray_jobs/experiment.py`` take the storage lock and connect Ray there, dcv.cli.start_ray).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from dcv import tracking
from dcv.analysis import analyze, read_analysis, write_analysis
from dcv.analysis.pairs import label_pairs
from dcv.circuits.methods import CROSS_MODEL_METHODS
from dcv.config import ExperimentConfig, config_to_dict, parse_config
from dcv.plan import plan_summary
from dcv.results import read_results, write_results
from dcv.storage import (
    CIRCUITS_FILE,
    CMAP_FILE,
    EFFECTS_FILE,
    NOISE_FLOOR_FILE,
    WEIGHT_CHANGE_FILE,
    StoragePath,
    atomic_path,
    check_storage_root,
    circuits_dir,
    local_folder,
    model_folder_problem,
    patching_dir,
    read_json,
    read_parquet,
    set_aside,
    storage_path,
    storage_root,
    weight_change_dir,
)

STAGES = (
    "base",
    "sweep",
    "benchmarks",
    "patching",
    "circuits",
    "weight_change",
    "calibration",
    "analysis",
    "report",
)
CONFIG_FILE = "experiment_config.json"
SOURCE_FILE = "dcv_source.json"  # inside base/: the model config the snapshot was made from
STAGE_SECONDS_FILE = "stage_seconds.json"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExperimentRun:
    storage: Path
    report_md: Path
    report_html: Path
    tracking_uri: str
    stage_seconds: dict[str, float]
    answer: list[str]  # the report's first section, paragraph by paragraph


def prepare_base(cfg: ExperimentConfig, storage: Path) -> ExperimentConfig:
    """Write the base model once to ``<storage>/base/``; the config every later stage uses names it.

    A snapshot made from another model config is refused (that storage belongs to another experiment).
    """
    from dcv.models import load_model_and_tokenizer, save_model

    folder = storage / "base"
    source = cfg.model.model_dump(mode="json", exclude={"cache_dir"})
    made_from = read_json(folder / SOURCE_FILE)  # an unreadable marker is moved aside: made again
    if made_from is not None and made_from != source:
        raise ValueError(
            f"{folder}: the base snapshot was made from model {made_from} but the config asks for "
            f"{source}; use another storage.root, or delete {folder} to start over"
        )
    # A snapshot is written whole with its marker (atomic_path); one without a valid marker or with
    # broken weights is moved aside whole (the bad marker inside it) and written again.
    problem = "no valid marker" if made_from is None else model_folder_problem(folder)
    if folder.exists() and problem:
        set_aside(folder, f"base snapshot: {problem}")
    if problem:
        model, tokenizer = load_model_and_tokenizer(cfg.model)
        with atomic_path(folder) as tmp:
            save_model(model, tokenizer, tmp)
            (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=1))
    snapshot = cfg.model.model_copy(update={"name": str(folder), "revision": None})
    return cfg.model_copy(update={"model": snapshot})


def _watch_trials(cfg: ExperimentConfig, names: list[str], progress: Progress, stop: threading.Event) -> None:
    """A progress line whenever another trial finishes (its trial.json appears), with an ETA."""
    from dcv.training.trial import TRIAL_FILE, trials_root

    def finished() -> int:
        return sum((trials_root(cfg) / name / TRIAL_FILE).is_file() for name in names)

    start, before = time.monotonic(), finished()
    last = before
    while not stop.wait(5.0):
        now = finished()
        if now != last:
            last = now
            done_here = now - before
            eta = (time.monotonic() - start) / done_here * (len(names) - now) if done_here else float("nan")
            progress(f"sweep: {now}/{len(names)} trials finished, ETA {eta:.0f} s")


def sweep_stage(cfg: ExperimentConfig, storage: Path, progress: Progress) -> pl.DataFrame:
    """Run the sweep, or only collect its table when every trial finished before."""
    from dcv.training.sweep import check_plan, collect_results, plan_trials, repair_sweep, run_sweep
    from dcv.training.trial import finished_trial

    specs = plan_trials(cfg)
    check_plan(cfg, specs)
    repair_sweep(cfg, specs)  # before the check below: a trial moved aside is trained again
    done = [spec.name for spec in specs if finished_trial(spec.config(cfg), spec.name) is not None]
    todo = len(specs) - len(done)
    progress(f"sweep: {len(specs)} trials, {len(done)} finished before (skipped), {todo} to train")
    if len(done) == len(specs):
        table = collect_results(cfg, specs)
        write_results(table, storage)
        return table
    stop = threading.Event()
    watcher = threading.Thread(
        target=_watch_trials, args=(cfg, [s.name for s in specs], progress, stop), daemon=True
    )
    watcher.start()
    try:
        return run_sweep(cfg)
    finally:
        stop.set()


def benchmarks_stage(
    cfg: ExperimentConfig, storage: Path, results: pl.DataFrame, progress: Progress
) -> tuple[pl.DataFrame, int]:
    """lm-eval scores of every model, joined into the results table (one ``bench/<task>/<metric>`` column
    each, stored again) and logged to each trial's MLflow run at the checkpoint's step."""
    from dcv.benchmarks import join_benchmarks, run_benchmark_stage

    if not cfg.benchmarks.tasks:
        return results, 0
    scores = run_benchmark_stage(cfg, results, storage, progress)
    results = join_benchmarks(results, scores)
    write_results(results, storage)
    columns = [c for c in results.columns if c.startswith("bench/")]
    for (trial,), rows in results.group_by("trial", maintain_order=True):
        run = tracking.get_or_create_child_run(cfg, trial)
        if set(columns) <= set(run.client.get_run(run.run_id).data.metrics):
            continue  # logged by an earlier run of this stage
        for row in rows.iter_rows(named=True):
            run.log_metrics({c: row[c] for c in columns if row[c] is not None}, step=row["step"])
    return results, scores.height


def _record(storage: Path, seconds: dict[str, float]) -> None:
    path = storage / STAGE_SECONDS_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(seconds, indent=1))


def _about(cfg: ExperimentConfig, storage: StoragePath, results: pl.DataFrame) -> list[str]:
    marker = storage / "base" / SOURCE_FILE
    source = json.loads(marker.read_text())["name"] if marker.is_file() else cfg.model.name
    trials = results.select("trial", "method").unique()
    first, second = cfg.comparison.methods
    counts = {m: trials.filter(pl.col("method") == m).height for m in (first, second)}
    return [
        f"Experiment {cfg.name}: base model {source}, target task {cfg.target_task.name}, "
        f"probes {', '.join(p.name for p in cfg.probes)}; {counts[first]} {first.upper()} and "
        f"{counts[second]} {second.upper()} runs{_external_note(cfg, results)}, "
        f"{results.height} evaluated checkpoints; patching {', '.join(cfg.patching.methods)}; circuits by "
        f"{cfg.circuits.selection} (tau {cfg.circuits.tau}, at most {cfg.circuits.k_max} heads).",
        "Forgetting = base score - checkpoint score (accuracy: LD > 0; LD: mean logit difference), over the "
        "prior probes the base model does. Preservation P = share of the base circuit's heads still in the "
        "checkpoint's circuit; Jaccard J = shared heads over all heads of both. v_h = sign(e_base) (e_base - "
        "e_M) / |e_base| (positive = the head lost part of its base role); V = |e_base|-weighted mean of "
        "v_h, "
        "relative (e_M divided by the checkpoint's own gap) and absolute (divided by the base model's gap). "
        "A checkpoint whose gap fell below probes[].lost_fraction of the base gap has lost the behaviour "
        "('lost'): counted as forgetting, never as relative numbers. "
        f"DCV_h = v_h({first.upper()}) - v_h({second.upper()}). CIs: "
        "these runs: bootstrap over probe items and target test items, runs held fixed (the match is redone "
        "in each draw); across seeds: Welch's t on the runs' values with the item variance folded in.",
    ]


def _external_note(cfg: ExperimentConfig, results: pl.DataFrame) -> str:
    """Where the runs came from, and which pair is compared, when they were trained elsewhere."""
    if cfg.external is None:
        return ""
    first, second = cfg.comparison.methods
    labels = cfg.external.labels()
    others = [m for m in labels if m not in (first, second)]
    left_out = f"; runs labelled {', '.join(others)} are not compared" if others else ""
    if cfg.comparison.each_pair:
        n = len(label_pairs(cfg))
        left_out = f"; every pair of labels also, in the pairs table ({n} pairs, Bonferroni-corrected)"
    slots = (
        "" if (first, second) == ("sft", "rl") else " (the tables' sft columns hold the first, rl the second)"
    )
    return (
        f" (trained elsewhere, listed in external.runs; compared: {first} vs {second}, comparison.methods"
        f"{slots}{left_out})"
    )


def report_stage(cfg: ExperimentConfig, storage: StoragePath, seconds: dict[str, float]):
    """Figures and report from the stored analysis tables, logged to the MLflow parent run: the report and
    figures as artifacts, the answer table as an MLflow table (``answer.json``, shown in the run's
    Artifacts and the experiment's evaluation view) and CSV, the primary endpoint and the stage times as
    metrics, the primary verdict and the answer as tags (not one metric per cell of the headline). On an
    object-store root the report is built in a local folder and uploaded (dcv.storage.local_folder)."""
    from dcv.analysis.answer import answer_paragraphs, answer_table
    from dcv.calibration import read_calibration
    from dcv.report import build_report

    tables = read_analysis(storage)
    results = read_results(storage)
    calibration = read_calibration(storage)
    endpoint = cfg.analysis.primary.model_dump()
    parent = tracking.get_or_create_parent_run(cfg)
    primary = cfg.patching.methods[0]
    with local_folder(storage / "report") as out:
        md, page, figures = build_report(
            tables,
            out,
            f"dcv report: {cfg.name}",
            _about(cfg, storage, results),
            seconds,
            calibration,
            endpoint,
            cfg.comparison.methods,
        )
        parent.log_artifact(md, artifact_path="report")
        parent.log_artifact(page, artifact_path="report")
        for figure in figures:
            parent.log_artifact(figure, artifact_path="report/figures")
        table = answer_table(
            tables["headline"], primary, calibration, tables["base_circuits"], cfg.comparison.methods
        )
        if not table.is_empty():
            parent.log_table(table, "answer.json")
            parent.log_artifact(write_csv(table, out / "answer.csv"), artifact_path="report")
    md, page = storage / "report" / md.relative_to(out), storage / "report" / page.relative_to(out)
    seconds_metrics = {f"stage_seconds/{name}": value for name, value in seconds.items()}
    parent.log_metrics(primary_metrics(tables["headline"], primary, cfg.comparison.methods) | seconds_metrics)
    parent.set_tag("dcv.compared", " vs ".join(cfg.comparison.methods))
    answer = answer_paragraphs(
        tables["headline"], tables["base_circuits"], primary, calibration, endpoint, cfg.comparison.methods
    )
    parent.set_tag("dcv.primary", answer[0][:5000])
    parent.set_tag("dcv.verdict", primary_verdict(tables["headline"], primary))
    parent.set_tag("dcv.answer", "\n\n".join(answer)[:5000])
    return md, page, answer


def write_csv(frame: pl.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        frame.write_csv(tmp)
    return path


def _primary_row(headline: pl.DataFrame, patching: str) -> dict | None:
    if "role" not in headline.columns:
        return None
    rows = headline.filter((pl.col("patching") == patching) & (pl.col("role") == "primary"))
    return rows.row(0, named=True) if rows.height else None


def primary_verdict(headline: pl.DataFrame, patching: str) -> str:
    """The primary endpoint's verdicts as one tag value: "across seeds: ...; these runs: ..."."""
    row = _primary_row(headline, patching)
    if row is None:
        return "not compared (insufficient runs)"
    return f"across seeds: {row['verdict_seeds']}; these runs: {row['verdict_runs']}"


def primary_metrics(
    headline: pl.DataFrame, patching: str, labels: tuple[str, str] = ("sft", "rl")
) -> dict[str, float]:
    """The primary endpoint as a handful of MLflow metrics (``primary/<name>``): the first - second
    method's difference (``labels``: comparison.methods), both CIs, p, the MDE, the runs per method it
    would need and n per method (``primary/n_runs_<label>``)."""
    row = _primary_row(headline, patching)
    if row is None:
        return {}
    names = ("mean", "ci_low", "ci_high", "seed_ci_low", "seed_ci_high", "p_value", "mde", "runs_needed")
    metrics = {f"primary/{n}": float(row[n]) for n in names if row[n] is not None and np.isfinite(row[n])}
    first, second = labels
    return metrics | {
        f"primary/n_runs_{first}": row["n_runs_sft"],
        f"primary/n_runs_{second}": row["n_runs_rl"],
    }


def preflight(cfg: ExperimentConfig) -> None:
    """Every check of ``cfg`` that can fail before compute, each naming the field: it only reads, so a
    bad input fails in seconds, before Ray starts, a model loads or anything is written under
    storage.root. (``parse_config`` checked the config itself; these check it against the world.)"""
    from dcv.training.sweep import check_plan, plan_trials

    check_storage_root(cfg.storage.root)  # the root `dcv validate` checks: an object store is refused here
    if cfg.external is not None:
        from dcv.external import check_external

        check_external(cfg)  # every listed checkpoint at the file level, each problem naming run and step
    else:
        check_plan(
            cfg, plan_trials(cfg)
        )  # every trial's config; a sweep folder keeps the plan it started with
    if cfg.benchmarks.tasks:
        from dcv.benchmarks import check_benchmarks

        check_benchmarks(cfg.benchmarks)  # task names and local rows, before any model is loaded
    # Every stage logs to MLflow: a tracking server that is down or refuses our credentials fails here.
    tracking.check_tracking_server(tracking.resolve_tracking_uri(cfg))


def run_experiment(
    cfg: ExperimentConfig,
    progress: Progress = print,
    stage_line: Progress | None = None,
    connect: Callable[[], None] | None = None,
) -> ExperimentRun:
    """``preflight``, then every stage in order, each resuming; needs a connected Ray.

    ``connect`` runs between the checks and the first write: ``dcv run`` takes the storage lock, starts
    its log and connects Ray there (dcv.cli.start_ray), so a bad input never waits for Ray. ``stage_line``
    gets each stage's started and done lines (default ``progress``); ``progress`` gets what happens
    inside a stage (items done / total, ETA). ``dcv run`` prints the first as lines and keeps the second
    to one line per stage (dcv.console)."""
    preflight(cfg)
    # What the run will cost, before it spends anything (dcv.plan; `dcv plan` prints every stage).
    (stage_line or progress)(plan_summary(cfg, cfg.name))
    if connect is not None:
        connect()
    storage = storage_root(cfg)
    seconds: dict[str, float] = {}
    parent = tracking.get_or_create_parent_run(cfg)
    parent.restart()  # a rerun continues the same parent run; it ends FINISHED (or FAILED) with the run
    try:
        return _run_stages(cfg, storage, seconds, parent, progress, stage_line or progress)
    except BaseException:
        parent.finish("FAILED")
        raise


def _run_stages(
    cfg: ExperimentConfig,
    storage: Path,
    seconds: dict[str, float],
    parent,
    progress: Progress,
    stage_line: Progress,
):
    from dcv.circuits.model_circuits import run_circuits
    from dcv.circuits.pipeline import log_pipeline_run, run_pipeline

    def stage(name: str) -> float:
        stage_line(f"[{STAGES.index(name) + 1}/{len(STAGES)} {name}] started")
        return time.perf_counter()

    def finished(name: str, start: float, detail: str = "") -> None:
        seconds[name] = round(time.perf_counter() - start, 1)
        stage_line(f"[{STAGES.index(name) + 1}/{len(STAGES)} {name}] done in {seconds[name]:.0f} s{detail}")

    start = stage("base")
    cfg = prepare_base(cfg, storage)
    with atomic_path(storage / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(config_to_dict(cfg), indent=1))
    finished("base", start, f": {cfg.model.name}")

    start = stage("sweep")
    if cfg.external is not None:
        from dcv.external import run_external

        # Runs trained elsewhere: their checkpoints are evaluated as a trial evaluates its own (dcv.external).
        external = run_external(cfg, progress)
        results = external.table
        done = f"{external.stage.computed} evaluated, {external.stage.skipped} skipped"
        finished("sweep", start, f": external runs, {results.height} checkpoints ({done})")
    else:
        results = sweep_stage(cfg, storage, progress)
        finished("sweep", start, f": {results.height} evaluated checkpoints")

    start = stage("benchmarks")
    results, n_scores = benchmarks_stage(cfg, storage, results, progress)
    finished("benchmarks", start, f": {n_scores} scores" if cfg.benchmarks.tasks else ": none configured")

    start = stage("patching")
    run = run_pipeline(cfg, progress=progress)
    log_pipeline_run(cfg, run)
    finished("patching", start, f": {run.computed} items computed, {run.skipped} skipped")

    start = stage("circuits")
    circuits = run_circuits(cfg, run.table, storage, progress)
    finished("circuits", start, f": {circuits.height} circuits")

    start = stage("weight_change")
    weight_change = None
    if cfg.weight_change.enabled:
        from dcv.circuits.weight_change import run_weight_change
        from dcv.stages import log_stage

        changed = run_weight_change(cfg, results, storage, progress)
        log_stage(cfg, "weight-change", "weight_change", changed, changed.path)
        weight_change = changed.table
        finished(
            "weight_change", start, f": {changed.computed} checkpoints computed, {changed.skipped} skipped"
        )
    else:
        finished("weight_change", start, ": off (weight_change.enabled: false)")

    start = stage("calibration")
    if cfg.calibration.enabled:
        from dcv.calibration import calibration_path, run_calibration

        calibration = run_calibration(cfg, storage, progress=progress)
        parent.log_artifact(calibration_path(storage), artifact_path="calibration")
        plants = calibration.unique(["probe", "kind", "k", "alpha"]).height  # one row per metric of each
        finished("calibration", start, f": {plants} (probe, plant) pairs measured")
    else:
        finished("calibration", start, ": off (calibration.enabled: false)")

    start = stage("analysis")
    floor = read_parquet(circuits_dir(storage) / NOISE_FLOOR_FILE)
    cmap = read_cmap(cfg, storage)
    tables = analyze(cfg, results, run.table, circuits, floor, weight_change, cmap)
    paths = write_analysis(tables, storage)
    for path in paths:
        parent.log_artifact(path, artifact_path="analysis")
    finished("analysis", start, f": {len(tables)} tables in {paths[0].parent}")

    start = stage("report")
    md, page, answer = report_stage(cfg, storage, dict(seconds))
    finished("report", start, f": {page}")
    _record(storage, seconds)
    parent.finish("FINISHED")
    return ExperimentRun(storage, md, page, tracking.resolve_tracking_uri(cfg), seconds, answer)


def read_weight_change(cfg: ExperimentConfig, storage: Path) -> pl.DataFrame | None:
    """The weight-change stage's table where the config runs that stage (None otherwise)."""
    path = weight_change_dir(storage) / WEIGHT_CHANGE_FILE
    return read_parquet(path) if cfg.weight_change.enabled else None


def read_cmap(cfg: ExperimentConfig, storage: Path) -> pl.DataFrame | None:
    """The patching stage's CMAP table where ``patching.methods`` has cmap (None otherwise)."""
    measured = set(CROSS_MODEL_METHODS) & set(cfg.patching.methods)
    return read_parquet(patching_dir(storage) / CMAP_FILE) if measured else None


def load_run_config(run_dir: str | StoragePath) -> ExperimentConfig:
    """The config a ``dcv run`` stored in its storage folder, with that folder as its storage (a run that
    was copied or moved reads and writes where it is now). ``run_dir`` may be an object-store URI."""
    root = storage_path(run_dir)
    path = root / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a dcv run folder (run `dcv run CONFIG` first)")
    raw = json.loads(path.read_text())
    raw["storage"] = {**raw.get("storage", {}), "root": str(root)}
    return parse_config(raw, source=str(path))


def rebuild_report(run_dir: str | StoragePath) -> tuple[StoragePath, StoragePath, list[str]]:
    """The analysis and the report again from a run's stored tables (``dcv report RUN_DIR``): no model is
    loaded, nothing is trained or patched. ``run_dir`` may be a copy of the run (its storage is used, not
    the one the stored config names), so a trimmed results table gives the comparison it supports. It
    reads and writes only through dcv.storage, so ``run_dir`` may be on an object store (``s3://...``)."""
    cfg = load_run_config(run_dir)
    storage = storage_path(cfg.storage.root)
    effects = read_parquet(patching_dir(storage) / EFFECTS_FILE)
    circuits = read_parquet(circuits_dir(storage) / CIRCUITS_FILE)
    if effects is not None and circuits is not None:
        floor = read_parquet(circuits_dir(storage) / NOISE_FLOOR_FILE)
        changes, cmap = read_weight_change(cfg, storage), read_cmap(cfg, storage)
        tables = analyze(cfg, read_results(storage), effects, circuits, floor, changes, cmap)
        write_analysis(tables, storage)
    seconds = read_json(storage / STAGE_SECONDS_FILE) or {}
    return report_stage(cfg, storage, seconds)
