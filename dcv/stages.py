"""One runner for every resumable stage: skip what is finished, compute the rest on a warm Ray actor pool.

A stage is data (``Stage``): a config, a work table with one row per item, the schema of an item's file
and a compute function. Each work row carries the item's ``item_id``, the ``path`` of its file (named by
``dcv.storage.content_hash`` of everything that decides its numbers), ``n_rows`` (the rows a finished file
has; null: any number) and whatever else ``compute`` needs. The caller plans the table and reads the
assembled one (``assemble``); ``run_stage`` is the only code that

- skips finished items: an item is done when its file reads back with the schema and row count
  (``dcv.storage.read_parquet``: an invalid file is moved aside and the item is computed again);
- launches the rest on a Ray Data actor pool (``Resources``: actors, CPUs and GPUs per actor, from
  config), one item per task in work-table order, so an actor that takes consecutive items of one
  checkpoint loads it once; a killed actor is restarted and its item retried (Ray Data's defaults);
- sets an actor up once (``StageWorker``): torch threads = its CPUs, the device, one loaded model kept
  across items until an item names another;
- writes each item's rows atomically, and prints progress with an ETA.

``compute(worker, item, context)`` runs inside an actor: ``worker.cfg`` is the parsed config,
``worker.model(model, checkpoint)`` the loaded model (``worker.base_model()`` the base, kept beside it for
items that need two models), ``context`` the stage's read-only inputs (probe
items, effects, ...), sent to each actor once. ``log_stage`` puts a stage's counts in its MLflow child run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from dcv.config import ExperimentConfig, parse_config
from dcv.storage import BASE_MODEL, as_path, read_parquet, write_parquet

Progress = Callable[[str], None]
Compute = Callable[["StageWorker", dict, Any], pl.DataFrame]
# Columns every work table has; a stage adds its own.
WORK_COLUMNS = {"item_id": pl.String, "path": pl.String, "n_rows": pl.Int64}


@dataclass(frozen=True)
class Resources:
    num_actors: int  # actors in the pool (fewer when fewer items are pending)
    num_cpus: float  # per actor; also its torch threads
    num_gpus: float  # per actor; > 0 puts the model on CUDA when there is one
    fields: tuple[str, str, str]  # the config fields the three come from, for errors


@dataclass(frozen=True)
class Stage:
    name: str  # in progress lines, errors and the MLflow child run
    cfg: ExperimentConfig
    work: pl.DataFrame  # WORK_COLUMNS plus the stage's own
    schema: dict  # of each item's file
    compute: Compute  # a module-level function (actors import it by name)
    resources: Resources
    context: Any = None


@dataclass(frozen=True)
class StageRun:
    table: pl.DataFrame  # every item's rows, in work-table order
    total: int  # items in the work table
    skipped: int  # items finished by an earlier run
    computed: int  # items computed by this run
    model_loads: int  # models the actors loaded (at least one per checkpoint an actor saw)
    seconds: float
    path: Path | None = None  # where the caller wrote the assembled table


def patching_resources(cfg: ExperimentConfig) -> Resources:
    """The actor pool of the stages that load models (patching, circuits, noise floor)."""
    p = cfg.patching
    fields = ("patching.num_actors", "patching.num_cpus_per_actor", "patching.num_gpus_per_actor")
    return Resources(p.num_actors, p.num_cpus_per_actor, p.num_gpus_per_actor, fields)


def check_resources(stage: str, resources: Resources, cluster: dict[str, float]) -> None:
    """The pool must fit the cluster (``ray.cluster_resources()``); checked before any compute."""
    actors, cpus, gpus = resources.fields
    problems = []
    for key, per_actor, field in (("CPU", resources.num_cpus, cpus), ("GPU", resources.num_gpus, gpus)):
        need, have = resources.num_actors * per_actor, cluster.get(key, 0.0)
        if need > have:
            problems.append(
                f"[{stage}] {actors}={resources.num_actors} x {field}={per_actor} needs {need:g} {key}s; "
                f"the Ray cluster has {have:g}; lower {actors} or {field}"
            )
    if problems:
        raise ValueError("\n".join(problems))


def read_item(stage: Stage, item: dict) -> pl.DataFrame | None:
    """A finished item's rows, or None (absent, or invalid and moved aside)."""
    n_rows = item["n_rows"]
    return read_parquet(as_path(item["path"]), stage.schema, None if n_rows is None else int(n_rows))


def split_done(stage: Stage) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(pending, done) rows of the work table."""
    rows = stage.work.iter_rows(named=True)
    done = pl.Series([read_item(stage, item) is not None for item in rows], dtype=pl.Boolean)  # empty: Null
    return stage.work.filter(~done), stage.work.filter(done)


def assemble(stage: Stage) -> pl.DataFrame:
    """Every item's rows, in work-table order; an unfinished item is an error naming it."""
    tables, missing = [], []
    for item in stage.work.iter_rows(named=True):
        table = read_item(stage, item)
        (missing.append(item["item_id"]) if table is None else tables.append(table))
    if missing:
        raise FileNotFoundError(
            f"{stage.name}: {len(missing)} of {stage.work.height} items are not finished (first: "
            f"{missing[0]}); rerun the stage"
        )
    return pl.concat(tables) if tables else pl.DataFrame(schema=stage.schema)


def load_stage_model(cfg: ExperimentConfig, model: str, checkpoint: str, tokenizer=None):
    """The base model (``cfg.model``) or a checkpoint folder, with the base model's dtype."""
    from dcv.models import load_model

    model_cfg = cfg.model if model == BASE_MODEL else cfg.model.model_copy(update={"name": checkpoint})
    return load_model(model_cfg, tokenizer)


class StageWorker:
    """One actor of a stage's pool (``map_batches(StageWorker, ...)``): set up once, then one item per
    call. Returns one row per item: item_id, rows written, seconds, the actor's pid, models loaded."""

    def __init__(self, cfg: dict, compute: Compute, context: Any, resources: Resources):
        import torch

        self.cfg = parse_config(cfg)
        self.compute, self.context = compute, context
        # One intra-op thread per CPU Ray gave this actor, so actors on one node do not oversubscribe it.
        torch.set_num_threads(max(1, int(resources.num_cpus)))
        self.device = "cuda" if resources.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.loaded: tuple[str, str] | None = None
        self.loads = 0
        self._model = None
        self._base = None  # the base model, kept beside the current one for two-model items (cmap)

    def model(self, model: str, checkpoint: str):
        """``model``'s weights on this actor's device, loaded when an item names another model."""
        if self.loaded != (model, checkpoint):
            self._model = None  # free the old weights before loading the next ones
            self._model = load_stage_model(self.cfg, model, checkpoint).to(self.device)
            self.loaded = (model, checkpoint)
            self.loads += 1
        return self._model

    def base_model(self):
        """The base model (``cfg.model``) on this actor's device, loaded once per actor and kept beside
        ``model(...)``'s, so a stage over many checkpoints that also needs the base loads it once."""
        if self.loaded == (BASE_MODEL, self.cfg.model.name):
            return self._model
        if self._base is None:
            self._base = load_stage_model(self.cfg, BASE_MODEL, self.cfg.model.name).to(self.device)
            self.loads += 1
        return self._base

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        out: dict[str, list] = {"item_id": [], "rows": [], "seconds": [], "pid": [], "loads": []}
        for i in range(len(batch["item_id"])):
            item = {key: _plain(values[i]) for key, values in batch.items()}
            start, loads = time.perf_counter(), self.loads
            table = self.compute(self, item, self.context)
            write_parquet(table, as_path(item["path"]))
            out["item_id"].append(item["item_id"])
            out["rows"].append(table.height)
            out["seconds"].append(time.perf_counter() - start)
            out["pid"].append(os.getpid())
            out["loads"].append(self.loads - loads)
        return {key: np.asarray(values) for key, values in out.items()}


def _plain(value: Any) -> Any:
    """A numpy scalar of a Ray Data batch as the Python value the work table held."""
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value


def run_stage(stage: Stage, progress: Progress = print) -> StageRun:
    """Compute every unfinished item of ``stage`` on a Ray Data actor pool, then assemble its table.
    Needs a connected Ray; bad input should fail in the caller's plan, before this is called."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError(f"{stage.name} needs a connected Ray (ray.init); dcv's commands connect one")
    start = time.monotonic()
    pending, done = split_done(stage)
    total, skipped = stage.work.height, done.height
    progress(f"{stage.name}: {total} items, {skipped} finished before (skipped), {pending.height} to compute")
    computed = loads = 0
    if pending.height:
        r = stage.resources
        # One item per block and per batch: Ray Data hands items to actors one at a time (finest load
        # balance, a killed actor loses one item), in work-table order (an actor rarely reloads).
        rows = ray.data.from_items(pending.to_dicts(), override_num_blocks=pending.height).map_batches(
            StageWorker,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=max(1, min(r.num_actors, pending.height))),
            num_cpus=r.num_cpus,
            num_gpus=r.num_gpus,
            fn_constructor_kwargs={
                "cfg": stage.cfg.model_dump(mode="json"),
                "compute": stage.compute,
                "context": stage.context,
                "resources": r,
            },
            # Ray Data's actor pools default to max_restarts=-1 and max_task_retries=-1: a killed actor
            # is restarted and its item retried (tests/circuits/test_pipeline.py kills one).
        )
        last, started = 0.0, time.monotonic()
        for row in rows.iter_rows():
            computed += 1
            loads += int(row["loads"])
            # A line per item while they are few or slow; at most one every 2 s at paper scale.
            if computed == pending.height or time.monotonic() - last >= 2.0:
                last = time.monotonic()
                eta = (time.monotonic() - started) / computed * (pending.height - computed)
                done = skipped + computed
                progress(f"{stage.name}: {done}/{total} items done ({skipped} skipped), ETA {eta:.0f} s")
    table = assemble(stage)
    return StageRun(table, total, skipped, computed, loads, time.monotonic() - start)


def log_stage(
    cfg: ExperimentConfig, run_name: str, prefix: str, run: StageRun, artifact: Path | None
) -> None:
    """A stage's counts (``<prefix>/items, computed, skipped, rows, seconds``) and its table in the
    experiment's MLflow child run ``run_name`` (tag dcv.stage=prefix): one run however often the stage is
    rerun; its metrics hold the last pass."""
    from dcv import tracking

    logged = tracking.get_or_create_child_run(cfg, run_name, tags={"dcv.stage": prefix})
    logged.log_metrics(
        {
            f"{prefix}/items": run.total,
            f"{prefix}/computed": run.computed,
            f"{prefix}/skipped": run.skipped,
            f"{prefix}/rows": run.table.height,
            f"{prefix}/seconds": run.seconds,
        }
    )
    if artifact is not None:
        logged.log_artifact(artifact, artifact_path=prefix)
    logged.finish()
