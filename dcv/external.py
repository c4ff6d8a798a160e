"""Runs trained elsewhere: measure their checkpoints instead of training (the config's ``external:``).

Most people who want the SFT-vs-RL circuit comparison already have checkpoints (veRL, OpenRLHF or TRL runs,
public trajectories such as Tulu 3's SFT -> DPO -> RLVR). Everything after training does not care who
trained the weights, so ``dcv run`` with ``external:`` replaces one stage: instead of the sweep, this
module evaluates every listed checkpoint with the code a trial evaluates its own with
(``dcv.training.checkpoints.EvaluationKit``: target accuracy, probe scores and KL to base, with the
per-item scores behind them) and writes the same results table (``dcv.results``). Patching, circuits,
weight change, calibration, the analysis and the report then run unchanged: they read only that table.

What a row of the table is, for a run: ``trial`` = the run id, ``method`` = its label, ``init`` = "base"
or "sft:<run>@<step>" for a run that continued from a listed checkpoint (the results table's format for
"started from that checkpoint", whatever the parent's label), and one row per listed step. Step 0 is the
weights the run started from: listed, or added (the base snapshot, or the parent checkpoint's folder), as
the sweep always evaluates its step 0.

Before any compute (``check_external``, called by ``dcv run``'s preflight and by ``dcv validate``), every
checkpoint is checked at the file level, and every problem is reported at once, each naming the run and
step: a folder without config.json or loadable weights, a hub revision that is not in the local hub cache
(dcv never downloads an external checkpoint), an architecture the patching code does not support or a
head grid other than the base's, and a tokenizer whose vocabulary differs from the base's (loaded once
per distinct set of tokenizer files). Step order and references between runs are checked by the config.

Evaluation is a resumable stage (``dcv.stages``): one item per distinct checkpoint folder, its file
``<storage>/external/items/<run>_<step>__<hash>.parquet`` named by everything that decides its scores
(the folder, its weight files' sizes and times, the model, evaluation, target task and probes config). A
rerun computes nothing; a checkpoint added to the config computes only its own item.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from dcv.config import ExperimentConfig, ExternalCheckpoint, is_local_path
from dcv.results import build_results_table, write_results
from dcv.stages import Stage, StageRun, StageWorker, patching_resources, run_stage
from dcv.storage import (
    content_hash,
    external_dir,
    file_slug,
    is_remote_storage,
    model_folder_problem,
    storage_root,
)

Progress = Callable[[str], None]
# One row per evaluated checkpoint: the scores as JSON (their keys depend on the probes configured).
ITEM_SCHEMA = {"checkpoint": pl.String, "metrics": pl.String, "item_scores": pl.String}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model")


class ExternalCheckpointError(ValueError):
    """Every problem of the config's external checkpoints, one line each, naming run and step."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("external checkpoints:\n" + "\n".join(f"  {p}" for p in problems))


@dataclass(frozen=True)
class PlannedCheckpoint:
    run: str
    method: str
    learning_rate: float | None
    seed: int
    init: str
    step: int
    folder: str  # a local HF folder: the listed path, the hub cache snapshot, or the base snapshot


def hub_snapshot(hub: str, revision: str, cache: Path | None) -> Path | None:
    """The local snapshot folder of ``hub`` at ``revision`` in the hub cache (a commit hash, or a branch
    or tag its refs/ resolve), or None when it is not there. Reads the cache only: never the network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(hub, "config.json", cache_dir=cache, revision=revision)
    return Path(found).parent if isinstance(found, str) else None


def checkpoint_folder(cfg: ExperimentConfig, ckpt: ExternalCheckpoint) -> tuple[Path | None, str]:
    """(local folder, "") or (None, what is wrong) for one listed checkpoint."""
    if ckpt.path is not None:
        folder = Path(ckpt.path).expanduser().resolve()
        if not folder.is_dir():
            return None, f"path {ckpt.path}: no such folder"
        return folder, ""
    folder = hub_snapshot(ckpt.hub, ckpt.revision, cfg.external.hub_cache)
    if folder is None:
        return None, (
            f"hub {ckpt.hub} revision {ckpt.revision}: not in the local hub cache "
            f"({cfg.external.hub_cache or 'HF_HUB_CACHE'}); dcv never downloads an external checkpoint: "
            f"run `hf download {ckpt.hub} --revision {ckpt.revision}` first"
        )
    return folder, ""


def base_folder(cfg: ExperimentConfig) -> tuple[Path | None, str]:
    """The base model's local folder (for its tokenizer and config), or a problem: with external runs, a
    hub base must already be in the hub cache too."""
    from dcv.models import BUILTIN_MODELS, resolve_model_source

    name = cfg.model.name
    if name in BUILTIN_MODELS or is_local_path(name) or is_remote_storage(name):
        return Path(resolve_model_source(cfg.model)), ""  # the base snapshot on an object store: its copy
    folder = hub_snapshot(name, cfg.model.revision or "main", cfg.external.hub_cache)
    if folder is None:
        return None, (
            f"model.name={name!r} revision {cfg.model.revision or 'main'}: not in the local hub cache; with "
            f"external runs the base is read from the cache too: `hf download {name}"
            + (f" --revision {cfg.model.revision}`" if cfg.model.revision else "`")
        )
    return folder, ""


def _base_shape(cfg: ExperimentConfig, folder: Path | None) -> tuple[str, int, int] | None:
    """(model_type, layers, heads) of the base model, from its config (tiny: from model.tiny)."""
    if cfg.model.name == "tiny":
        t = cfg.model.tiny
        return t.architecture, t.num_layers, t.num_heads
    if folder is None:
        return None
    config = json.loads((folder / "config.json").read_text())
    return config.get("model_type"), config.get("num_hidden_layers"), config.get("num_attention_heads")


def _tokenizer_key(folder: Path) -> str | None:
    """A digest of a folder's tokenizer files (None: it has none, and is evaluated with the base's)."""
    digest, found = hashlib.sha256(), False
    for name in TOKENIZER_FILES:
        path = folder / name
        if path.is_file():
            found = True
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest() if found else None


def _vocab(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False).get_vocab()


def check_external(cfg: ExperimentConfig) -> list[PlannedCheckpoint]:
    """Every external checkpoint, checked at the file level before compute; all problems are raised
    together (``ExternalCheckpointError``), each naming the run and step. Returns the planned rows (with
    step 0 added where a run does not list it; its folder is the base's, "" until the snapshot exists)."""
    from dcv.circuits.decoder import SUPPORTED_MODEL_TYPES

    assert cfg.external is not None, "check_external needs a config with external runs"
    problems: list[str] = []
    base, problem = base_folder(cfg)
    if problem:
        problems.append(f"[external] {problem}")
    shape = _base_shape(cfg, base)
    base_key = _tokenizer_key(base) if base is not None else None
    vocabs: dict[str, dict[str, int]] = {}  # tokenizer digest -> vocabulary, each loaded once

    def vocab_of(key: str, folder: Path) -> dict[str, int]:
        if key not in vocabs:
            vocabs[key] = _vocab(folder)
        return vocabs[key]

    folders: dict[tuple[str, int], str] = {}
    planned: list[PlannedCheckpoint] = []
    for i, run in enumerate(cfg.external.runs):
        where = f"external.runs[{i}] run {run.run!r}"
        init = "base" if run.continued_from is None else f"sft:{run.continued_from}"
        rows = []
        for ckpt in run.checkpoints:
            at = f"[external] {where} step {ckpt.step} ({ckpt.source()})"
            folder, problem = checkpoint_folder(cfg, ckpt)
            if folder is None:
                problems.append(f"{at}: {problem}")
                continue
            problem = model_folder_problem(folder)
            if problem:
                problems.append(f"{at}: {folder}: {problem}")
                continue
            config = json.loads((folder / "config.json").read_text())
            model_type = config.get("model_type")
            if model_type not in SUPPORTED_MODEL_TYPES:
                problems.append(
                    f"{at}: architecture {model_type!r} is not supported; head patching re-states "
                    f"the decoder layer of {', '.join(SUPPORTED_MODEL_TYPES)} models"
                )
                continue
            grid = (model_type, config.get("num_hidden_layers"), config.get("num_attention_heads"))
            if shape is not None and grid != shape:
                problems.append(
                    f"{at}: {grid[0]} with {grid[1]} layers x {grid[2]} heads, the base model is {shape[0]} "
                    f"with {shape[1]} x {shape[2]}: heads are compared one to one, so every checkpoint must "
                    "be a fine-tune of the base"
                )
                continue
            key = _tokenizer_key(folder)
            if key is not None and base_key is not None and key != base_key:
                ours, theirs = vocab_of(key, folder), vocab_of(base_key, base)
                if ours != theirs:
                    differ = len(set(ours.items()) ^ set(theirs.items()))
                    problems.append(
                        f"{at}: its tokenizer differs from the base model's ({len(ours)} vs {len(theirs)} "
                        f"tokens, {differ} entries differ): every checkpoint is evaluated and patched with "
                        "the base's tokenizer, so token ids must mean the same"
                    )
                    continue
            folders[(run.run, ckpt.step)] = str(folder)
            rows.append((ckpt.step, str(folder)))
        if rows and rows[0][0] != 0:
            if run.continued_from is None:
                start = ""  # the base snapshot, known once the base stage has written it
            else:
                parent, _, step = run.continued_from.rpartition("@")
                start = folders.get((parent, int(step)), "")
            rows.insert(0, (0, start))
        lr, seed = run.learning_rate, run.seed
        planned += [PlannedCheckpoint(run.run, run.method, lr, seed, init, s, f) for s, f in rows]
    if problems:
        raise ExternalCheckpointError(problems)
    return planned


def _weights_stamp(folder: Path) -> list[tuple[str, int, int]]:
    """Name, size and mtime of a folder's weight files: a folder whose weights were replaced is a new item."""
    stamps = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.suffix in (".safetensors", ".bin"):
            stat = path.stat()
            stamps.append((path.name, stat.st_size, stat.st_mtime_ns))
    return stamps


def evaluation_key(cfg: ExperimentConfig) -> dict[str, Any]:
    """What decides a checkpoint's scores besides its weights (as EvaluationKit.base_scores_file)."""
    return {
        "model": cfg.model.model_dump(mode="json", exclude={"cache_dir"}),
        "evaluation": cfg.evaluation.model_dump(mode="json"),
        "target_task": cfg.target_task.model_dump(mode="json"),
        "probes": [p.model_dump(mode="json") for p in cfg.probes],
    }


def plan_work(cfg: ExperimentConfig, planned: list[PlannedCheckpoint], storage: Path) -> pl.DataFrame:
    """The stage's work table: one item per distinct folder, named after its first (run, step)."""
    rows, seen = [], set()
    key = evaluation_key(cfg)
    for p in planned:
        if p.folder in seen:
            continue
        seen.add(p.folder)
        digest = content_hash({"folder": p.folder, "weights": _weights_stamp(Path(p.folder)), **key})
        item_id = f"{file_slug(p.run)}_{p.step}__{digest}"
        path = external_dir(storage) / "items" / f"{item_id}.parquet"
        rows.append({"item_id": item_id, "path": str(path), "n_rows": 1, "checkpoint": p.folder})
    schema = {"item_id": pl.String, "path": pl.String, "n_rows": pl.Int64, "checkpoint": pl.String}
    return pl.DataFrame(rows, schema=schema)


def evaluate_checkpoint(worker: StageWorker, item: dict, context: Any) -> pl.DataFrame:
    """One checkpoint's scores, by the trial's own evaluation (EvaluationKit.evaluate), on an actor."""
    kit = getattr(worker, "external_kit", None)
    if kit is None:
        from dcv.models import load_tokenizer
        from dcv.training.checkpoints import EvaluationKit

        # Built once per actor: the base model, its KL reference samples, the target items and probes.
        kit = EvaluationKit.build(worker.cfg, load_tokenizer(worker.cfg.model))
        kit.base_model.to(worker.device)
        worker.external_kit = kit
    scores = kit.evaluate(worker.model("checkpoint", item["checkpoint"]))
    return pl.DataFrame(
        {
            "checkpoint": [item["checkpoint"]],
            "metrics": [json.dumps(scores.metrics)],
            "item_scores": [json.dumps(scores.item_scores)],
        },
        schema=ITEM_SCHEMA,
    )


@dataclass(frozen=True)
class ExternalRunResult:
    table: pl.DataFrame  # the results table (dcv.results)
    stage: StageRun  # the evaluation stage's counts: items, computed, skipped


def run_external(cfg: ExperimentConfig, progress: Progress = print) -> ExternalRunResult:
    """Evaluate every external checkpoint not evaluated before; write the results table and log each run
    to its MLflow child run (tags dcv.method = its label). ``cfg`` is the experiment's after the base
    stage: its model.name is the base snapshot, step 0 of a run from the base. Needs a connected Ray."""
    planned = check_external(cfg)
    storage = storage_root(cfg)
    planned = [p if p.folder else _with_folder(p, cfg.model.name) for p in planned]
    work = plan_work(cfg, planned, storage)
    stage = Stage("external", cfg, work, ITEM_SCHEMA, evaluate_checkpoint, patching_resources(cfg))
    run = run_stage(stage, progress)
    scores = {row["checkpoint"]: row for row in run.table.iter_rows(named=True)}
    rows = []
    for p in planned:
        row = scores[p.folder]
        metrics = {"step": float(p.step), **json.loads(row["metrics"])}
        rows.append(
            {
                "trial": p.run,
                "method": p.method,
                "learning_rate": p.learning_rate,
                "seed": p.seed,
                "init": p.init,
                "step": p.step,
                "checkpoint": p.folder,
                "metrics": metrics,
                "item_scores": json.loads(row["item_scores"]),
            }
        )
    table = build_results_table(rows)
    path = write_results(table, storage)
    log_external_runs(cfg, planned, table, path)
    return ExternalRunResult(table, run)


def _with_folder(p: PlannedCheckpoint, folder: str) -> PlannedCheckpoint:
    return PlannedCheckpoint(p.run, p.method, p.learning_rate, p.seed, p.init, p.step, folder)


def log_external_runs(
    cfg: ExperimentConfig, planned: list[PlannedCheckpoint], table: pl.DataFrame, path: Path
) -> None:
    """One MLflow child run per external run (as a trial has): its label, source and every checkpoint's
    metrics by step; a rerun finds the run again and logs nothing twice. The table goes to the parent."""
    from dcv import tracking

    tracking.get_or_create_parent_run(cfg).log_artifact(path, artifact_path="results")
    sources = {(r.run, c.step): c.source() for r in cfg.external.runs for c in r.checkpoints}
    metric_columns = [c for c, t in table.schema.items() if t == pl.Float64 and c not in ("learning_rate",)]
    for (name,), rows in table.group_by("trial", maintain_order=True):
        first = rows.row(0, named=True)
        tags = {"dcv.stage": "external", "dcv.method": first["method"], "dcv.seed": str(first["seed"])}
        run = tracking.get_or_create_child_run(cfg, name, tags=tags)
        logged = set(run.client.get_run(run.run_id).data.metrics)
        run.log_params(
            {
                "trial.method": first["method"],
                "trial.init": first["init"],
                "trial.seed": first["seed"],
                **{f"checkpoint.{s}": sources.get((name, s), "start") for s in rows["step"]},
            }
        )
        present = {c for c in metric_columns if rows[c].null_count() < rows.height}
        if not present <= logged:  # else logged by an earlier run of this stage
            for row in rows.iter_rows(named=True):
                values = {c: row[c] for c in metric_columns if row[c] is not None}
                run.log_metrics(values, step=row["step"])
        run.finish()
