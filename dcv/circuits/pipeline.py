"""The patching pipeline: head effects of every checkpoint, sharded over a Ray Data actor pool.

The work grid is an explicit table (``build_work_items``, WORK_SCHEMA): one row per (model, probe,
patching method, head chunk). The models are the base model (``cfg.model``, model id ``base``) and every
checkpoint in the sweep's results table (``dcv.results.read_results``, model id ``<trial>@<step>``); the
probes are ``cfg.probes``, the methods ``cfg.patching.methods``, and a chunk is
``cfg.patching.head_chunk_size`` consecutive heads in (layer, head) order. Rows are sorted by checkpoint,
so an actor that takes consecutive items keeps its loaded model and reloads only when the checkpoint
changes.

Ray Data shards that table over an actor pool (``PatchItems``: one model per actor, CPU or GPU). Each
item's rows are written atomically to ``<storage>/patching/items/<item_id>.parquet``; the item id is
readable (model, probe, method, head range) and ends in a hash of everything that decides the numbers
(checkpoint path, probe config, for ``chem`` the target task, method, heads, ig steps, dtype), so a
changed config never reuses a stale file. A rerun skips every item whose file is readable, has
EFFECTS_SCHEMA and one row per head of the chunk; a killed actor's item is retried by Ray Data on a
restarted actor.

The assembled table (``read_effects``; also written to ``<storage>/patching/effects.parquet``) has one
row per (model, probe, method, layer, head), EFFECTS_SCHEMA:

    model       str    "base" or "<trial>@<step>"
    probe       str    probe name (ioi, capitals, greater_than, induction)
    method      str    patching method (exact, attribution, ig)
    layer       i32    the head's layer
    head        i32    the head's index in its layer
    effect      f64    e_h = mean_i(LD_clean - LD_patched) / mean_i(LD_clean - LD_corrupt)
    n_items     i32    probe items the effect is averaged over
    trial       str    the results table's trial; "base" for the base model
    step        i64    the checkpoint's optimizer step; 0 for the base model
    checkpoint  str    HF folder of the checkpoint; ``cfg.model.name`` for the base model
    item_delta  list[f64]  per probe item: LD_clean - LD_patched
    item_denominator  list[f64]  per probe item: LD_clean - LD_corrupt

The first seven columns are ``dcv.circuits.patching.EFFECT_SCHEMA``; the numbers come from
``dcv.circuits.patching.head_effects``, the only patching implementation. This module never starts Ray:
``run_pipeline`` needs a connected Ray (``dcv patch-all`` and ``ray_jobs/patch.py`` connect it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from dcv.circuits import MASK
from dcv.config import ExperimentConfig, ModelConfig, parse_config
from dcv.results import list_models, read_results
from dcv.storage import (
    BASE_MODEL,
    EFFECTS_FILE,
    content_hash,
    file_slug,
    items_dir,
    local_storage_root,
    patching_dir,
    probe_key,
    read_parquet,
    write_parquet,
)
from dcv.tables import EFFECTS_SCHEMA

# The work grid: one row per item; heads are head_start..head_end-1 in (layer, head) order.
WORK_SCHEMA = {
    "item_id": pl.String,
    "model": pl.String,
    "trial": pl.String,
    "step": pl.Int64,
    "checkpoint": pl.String,
    "probe": pl.String,
    "method": pl.String,
    "head_start": pl.Int32,
    "head_end": pl.Int32,
    "n_layers": pl.Int32,
    "n_heads": pl.Int32,
}


def item_path(storage_root: Path, item_id: str) -> Path:
    return items_dir(storage_root) / f"{item_id}.parquet"


def build_item_id(
    cfg: ExperimentConfig, model: str, checkpoint: str, probe: str, method: str, heads: tuple[int, int]
) -> str:
    """``<model>__<probe>__<method>__h<start>-<end>__<hash>``: stable across runs of the same config."""
    decides = {
        **probe_key(cfg, probe),
        "model": model,
        "checkpoint": checkpoint,
        # The base model's numbers depend on its whole config (for ``tiny``: shape and seed).
        "model_config": (
            cfg.model.model_dump(mode="json", exclude={"cache_dir"}) if model == BASE_MODEL else None
        ),
        "dtype": cfg.model.dtype,
        "method": method,
        "heads": list(heads),
        "ig_steps": cfg.patching.ig_steps if method == "ig" else None,
        "mask": cfg.circuits.mask.model_dump(mode="json") if method == MASK else None,
    }
    digest = content_hash(decides)
    return f"{file_slug(model)}__{probe}__{method}__h{heads[0]:05d}-{heads[1]:05d}__{digest}"


def model_head_grid(model_cfg: ModelConfig) -> tuple[int, int]:
    """(n_layers, n_heads) of a model from its config, without loading weights."""
    if model_cfg.name == "tiny":
        return model_cfg.tiny.num_layers, model_cfg.tiny.num_heads
    from transformers import AutoConfig

    from dcv.models import resolve_model_source

    config = AutoConfig.from_pretrained(resolve_model_source(model_cfg), revision=model_cfg.revision)
    return config.num_hidden_layers, config.num_attention_heads


def select_probes(cfg: ExperimentConfig, probes: Sequence[str] | None) -> list[str]:
    """The probes to patch: all of ``cfg.probes``, or a subset; an unknown name lists the valid ones."""
    names = [p.name for p in cfg.probes]
    if probes is None:
        return names
    unknown = [p for p in probes if p not in names]
    if unknown:
        raise ValueError(f"probe(s) {unknown} are not in the config's probes; choose from {', '.join(names)}")
    return list(dict.fromkeys(probes))


def build_work_items(
    cfg: ExperimentConfig, results: pl.DataFrame, probes: Sequence[str] | None = None
) -> pl.DataFrame:
    """The work grid (WORK_SCHEMA), sorted by checkpoint, then probe, method and head range."""
    probe_names = select_probes(cfg, probes)
    models = list_models(cfg, results)
    size = cfg.patching.head_chunk_size
    rows = []
    for model, trial, step, checkpoint in models.iter_rows():
        model_cfg = cfg.model if model == BASE_MODEL else cfg.model.model_copy(update={"name": checkpoint})
        n_layers, n_heads = model_head_grid(model_cfg)
        total = n_layers * n_heads
        for probe in probe_names:
            for method in cfg.patching.methods:
                # One mask is learned over all heads together: a mask item is never split into chunks.
                chunk = total if method == MASK else size
                for start in range(0, total, chunk):
                    heads = (start, min(start + chunk, total))
                    rows.append(
                        {
                            "item_id": build_item_id(cfg, model, checkpoint, probe, method, heads),
                            "model": model,
                            "trial": trial,
                            "step": step,
                            "checkpoint": checkpoint,
                            "probe": probe,
                            "method": method,
                            "head_start": heads[0],
                            "head_end": heads[1],
                            "n_layers": n_layers,
                            "n_heads": n_heads,
                        }
                    )
    return pl.DataFrame(rows, schema=WORK_SCHEMA).sort("checkpoint", "probe", "method", "head_start")


def item_heads(item: dict) -> list[tuple[int, int]]:
    """The item's heads as (layer, head), in (layer, head) order."""
    n_heads = int(item["n_heads"])
    return [divmod(i, n_heads) for i in range(int(item["head_start"]), int(item["head_end"]))]


def read_item(path: Path, n_rows: int) -> pl.DataFrame | None:
    """A finished item's rows, or None when the file is absent or invalid: unreadable, of another schema
    or size (then it is moved aside, ``dcv.storage.read_parquet``, and the item is patched again)."""
    return read_parquet(path, EFFECTS_SCHEMA, n_rows)


def split_done(work: pl.DataFrame, storage_root: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(pending, done) rows of the work grid; done = its item file is valid."""
    done = [
        read_item(item_path(storage_root, item_id), end - start) is not None
        for item_id, start, end in work.select("item_id", "head_start", "head_end").iter_rows()
    ]
    mask = pl.Series(done, dtype=pl.Boolean)
    return work.filter(~mask), work.filter(mask)


def compute_item(model, items: Sequence, item: dict, cfg: ExperimentConfig) -> pl.DataFrame:
    """One item's rows (EFFECTS_SCHEMA): ``item_effects`` on the item's heads, or learned masks."""
    from dcv.circuits.patching import effects_table, item_effects

    if item["method"] == MASK:
        from dcv.circuits.mask import mask_effects

        table = mask_effects(
            model,
            items,
            cfg.circuits.mask,
            str(item["model"]),
            str(item["probe"]),
            item_heads(item),
            batch_size=cfg.patching.batch_size,
        )
        # A mask has no per-item parts: one pseudo-item whose ratio is the mask value.
        delta = [[v] for v in table["effect"].to_list()]
        denominator = [[1.0]] * table.height
    else:
        effects = item_effects(
            model,
            items,
            str(item["method"]),
            heads=item_heads(item),
            batch_size=cfg.patching.batch_size,
            head_chunk_size=cfg.patching.head_chunk_size,
            ig_steps=cfg.patching.ig_steps,
        )
        table = effects_table(effects, str(item["model"]), str(item["probe"]), str(item["method"]))
        delta = effects.delta.double().tolist()
        denominator = [effects.denominator.double().tolist()] * table.height
    return table.with_columns(
        pl.lit(str(item["trial"]), pl.String).alias("trial"),
        pl.lit(int(item["step"]), pl.Int64).alias("step"),
        pl.lit(str(item["checkpoint"]), pl.String).alias("checkpoint"),
        pl.Series("item_delta", delta, dtype=pl.List(pl.Float64)),
        pl.Series("item_denominator", denominator, dtype=pl.List(pl.Float64)),
    ).select(list(EFFECTS_SCHEMA))


def load_item_model(cfg: ExperimentConfig, model: str, checkpoint: str, tokenizer=None):
    """The base model (``cfg.model``) or a checkpoint folder, with the base model's dtype."""
    from dcv.models import load_model

    model_cfg = cfg.model if model == BASE_MODEL else cfg.model.model_copy(update={"name": checkpoint})
    return load_model(model_cfg, tokenizer)


def read_effects(storage_root: Path, work: pl.DataFrame) -> pl.DataFrame:
    """The assembled table (EFFECTS_SCHEMA) of every item of ``work``; an unfinished item is an error."""
    tables, missing = [], []
    for item_id, start, end in work.select("item_id", "head_start", "head_end").iter_rows():
        table = read_item(item_path(storage_root, item_id), end - start)
        if table is None:
            missing.append(item_id)
        else:
            tables.append(table)
    if missing:
        raise FileNotFoundError(
            f"{items_dir(storage_root)}: {len(missing)} of {work.height} items are not finished "
            f"(first: {missing[0]}); rerun dcv patch-all"
        )
    frame = pl.concat(tables) if tables else pl.DataFrame(schema=EFFECTS_SCHEMA)
    return frame.sort("checkpoint", "model", "probe", "method", "layer", "head")


def check_resources(cfg: ExperimentConfig, resources: dict[str, float]) -> None:
    """The actor pool must fit the cluster (``ray.cluster_resources()``); checked before any compute."""
    p = cfg.patching
    problems = []
    for key, per_actor, field in (
        ("CPU", p.num_cpus_per_actor, "num_cpus_per_actor"),
        ("GPU", p.num_gpus_per_actor, "num_gpus_per_actor"),
    ):
        need, have = p.num_actors * per_actor, resources.get(key, 0.0)
        if need > have:
            problems.append(
                f"[patching] patching.num_actors={p.num_actors} x patching.{field}={per_actor} needs "
                f"{need:g} {key}s; the Ray cluster has {have:g}; lower num_actors or {field}"
            )
    if problems:
        raise ValueError("\n".join(problems))


class PatchItems:
    """The Ray Data stage: a callable class run by an actor pool (``map_batches(PatchItems, ...)``).

    Each actor keeps one loaded model and reloads only when an item names another checkpoint; for each
    item it computes the rows with ``compute_item`` and writes them atomically to the item's file. It
    returns one row per item: item_id, rows written, seconds, the actor's pid, whether it loaded a model.
    """

    def __init__(self, cfg: dict, probe_items: dict[str, list], storage_root: str):
        import torch

        self.cfg = parse_config(cfg)
        self.probe_items = probe_items
        self.storage_root = Path(storage_root)
        # One intra-op thread per CPU Ray gave this actor, so actors on one node do not oversubscribe it.
        torch.set_num_threads(max(1, int(self.cfg.patching.num_cpus_per_actor)))
        use_gpu = self.cfg.patching.num_gpus_per_actor > 0 and torch.cuda.is_available()
        self.device = "cuda" if use_gpu else "cpu"
        self.checkpoint: tuple[str, str] | None = None
        self.model = None

    def _model_for(self, model: str, checkpoint: str) -> bool:
        if self.checkpoint == (model, checkpoint):
            return False
        from dcv.circuits.decoder import model_shape

        self.model = None  # free the old weights before loading the next ones
        self.model = load_item_model(self.cfg, model, checkpoint).to(self.device)
        self.checkpoint = (model, checkpoint)
        self.shape = model_shape(self.model)
        return True

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        out: dict[str, list] = {"item_id": [], "rows": [], "seconds": [], "pid": [], "loaded": []}
        for i in range(len(batch["item_id"])):
            item = {key: values[i] for key, values in batch.items()}
            start = time.perf_counter()
            loaded = self._model_for(str(item["model"]), str(item["checkpoint"]))
            if (self.shape.n_layers, self.shape.n_heads) != (int(item["n_layers"]), int(item["n_heads"])):
                raise ValueError(
                    f"checkpoint {item['checkpoint']}: {self.shape.n_layers} layers x {self.shape.n_heads} "
                    f"heads, but its config.json said {item['n_layers']} x {item['n_heads']}"
                )
            table = compute_item(self.model, self.probe_items[str(item["probe"])], item, self.cfg)
            write_parquet(table, item_path(self.storage_root, str(item["item_id"])))
            out["item_id"].append(str(item["item_id"]))
            out["rows"].append(table.height)
            out["seconds"].append(time.perf_counter() - start)
            out["pid"].append(os.getpid())
            out["loaded"].append(loaded)
        return {key: np.asarray(values) for key, values in out.items()}


@dataclass(frozen=True)
class PipelineRun:
    table: pl.DataFrame  # the assembled EFFECTS_SCHEMA table
    total: int  # items in the work grid
    skipped: int  # items finished by an earlier run
    computed: int  # items computed by this run
    model_loads: int  # models loaded by the actors (at least one per checkpoint an actor saw)
    path: Path  # <storage>/patching/effects.parquet


def wait_for_tasks(
    refs: list, label: str, total: int, progress: Callable[[str], None], start: float | None = None
) -> None:
    """Wait for Ray task ``refs`` (the unfinished ones of ``total`` jobs), printing done counts and an ETA
    from the time per task so far; a failed task raises here."""
    import ray

    start = time.monotonic() if start is None else start
    pending, finished, computed = list(refs), total - len(refs), 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)
        finished, computed = finished + 1, computed + 1
        eta = (time.monotonic() - start) / computed * len(pending)
        progress(f"{label}: {finished}/{total} done, ETA {eta:.0f} s")


def run_pipeline(
    cfg: ExperimentConfig,
    probes: Sequence[str] | None = None,
    progress: Callable[[str], None] = print,
    work: pl.DataFrame | None = None,
    out: Path | None = None,
) -> PipelineRun:
    """Patch every unfinished item on a Ray Data actor pool, then assemble and write the table.

    ``work`` is the grid (default: every model of the sweep's results table); the assembled table goes to
    ``out`` (default ``<storage>/patching/effects.parquet``). Needs a connected Ray. Everything that can
    fail on bad input (results table, checkpoint folders, probe names, the pool against the cluster) fails
    before any actor starts.
    """
    import ray

    from dcv.models import load_tokenizer
    from dcv.tasks.probes import build_probe

    if not ray.is_initialized():
        raise RuntimeError("run_pipeline needs a connected Ray (ray.init); dcv patch-all connects one")
    storage = local_storage_root(cfg)
    work = build_work_items(cfg, read_results(storage), probes) if work is None else work
    check_resources(cfg, ray.cluster_resources())
    pending, done = split_done(work, storage)
    total, skipped = work.height, done.height
    progress(f"patching: {total} items, {skipped} finished before (skipped), {pending.height} to compute")
    computed = loads = 0
    if pending.height:
        tokenizer = load_tokenizer(cfg.model)
        names = pending["probe"].unique().to_list()
        probe_items = {
            name: list(build_probe(cfg.probe(name), tokenizer, cfg.target_task).items) for name in names
        }
        p = cfg.patching
        # One item per block and per batch: Ray Data hands items to actors one at a time (finest load
        # balance, a killed actor loses one item), in checkpoint order (an actor rarely reloads).
        results = ray.data.from_items(pending.to_dicts(), override_num_blocks=pending.height).map_batches(
            PatchItems,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=p.num_actors),
            num_cpus=p.num_cpus_per_actor,
            num_gpus=p.num_gpus_per_actor,
            fn_constructor_kwargs={
                "cfg": cfg.model_dump(mode="json"),
                "probe_items": probe_items,
                "storage_root": str(storage),
            },
            # Ray Data's actor pools default to max_restarts=-1 and max_task_retries=-1: a killed actor
            # is restarted and its item retried (tests/circuits/test_pipeline.py kills one).
        )
        last, started = 0.0, time.monotonic()
        for row in results.iter_rows():
            computed += 1
            loads += int(row["loaded"])
            # A line per item while they are few or slow; at most one every 2 s at paper scale.
            if computed == pending.height or time.monotonic() - last >= 2.0:
                last = time.monotonic()
                eta = (time.monotonic() - started) / computed * (pending.height - computed)
                done = skipped + computed
                progress(f"patching: {done}/{total} items done ({skipped} skipped), ETA {eta:.0f} s")
    table = read_effects(storage, work)
    path = write_parquet(table, patching_dir(storage) / EFFECTS_FILE if out is None else out)
    return PipelineRun(table, total, skipped, computed, loads, path)


def log_pipeline_run(cfg: ExperimentConfig, run: PipelineRun, seconds: float) -> None:
    """The run's counts and its effects table in the experiment's ``patch-all`` MLflow child run (tag
    dcv.stage=patch): one run for the stage however often it is rerun; its metrics hold the last pass."""
    from dcv import tracking

    logged = tracking.get_or_create_child_run(cfg, "patch-all", tags={"dcv.stage": "patch"})
    logged.log_metrics(
        {
            "patch/items": run.total,
            "patch/computed": run.computed,
            "patch/skipped": run.skipped,
            "patch/rows": run.table.height,
            "patch/seconds": seconds,
        }
    )
    logged.log_artifact(run.path, artifact_path="patching")
    logged.finish()
