"""The patching stage: head effects of every checkpoint, on the stage runner's actor pool (``dcv.stages``).

The work grid is an explicit table (``build_work_items``, WORK_SCHEMA): one row per (model, probe,
method, head chunk). The models are the base model (``cfg.model``, model id ``base``) and every
checkpoint in the sweep's results table (``dcv.results.list_models``, model id ``<trial>@<step>``); the
probes are ``cfg.probes`` (with ``chem``, whose items are the target task's questions), the methods
``cfg.patching.methods``, and a chunk is ``cfg.patching.head_chunk_size`` consecutive heads in (layer,
head) order; a ``mask`` item is never split (one mask is learned over all heads together). Rows are sorted
by checkpoint, so an actor that takes consecutive items keeps its loaded model.

``dcv.stages.run_stage`` computes the unfinished items (``patch_item``) and skips the rest. Each item's
rows are written atomically to ``<storage>/patching/items/<item_id>.parquet``; the item id is readable
(model, probe, method, head range) and ends in a hash of everything that decides the numbers (checkpoint
path, probe config, for ``chem`` the target task, method, heads, dtype, and the settings the method's
record keys in ``dcv.circuits.methods``: ig steps, the mask config and batch size), so a changed config
never reuses a stale file. A file counts as finished when it is readable, has EFFECTS_SCHEMA and one row
per head of the chunk.

The assembled table (``run_pipeline``; written to ``<storage>/patching/effects.parquet``) has one row per
(model, probe, method, layer, head), ``dcv.tables.EFFECTS_SCHEMA``:

    model       str    "base" or "<trial>@<step>"
    probe       str    probe name (one of dcv.config.PROBE_NAMES)
    method      str    exact, attribution, ig (patching) or mask (learned masks: effect = m_h)
    layer       i32    the head's layer
    head        i32    the head's index in its layer
    effect      f64    e_h = mean_i(LD_clean - LD_patched) / mean_i(LD_clean - LD_corrupt)
    n_items     i32    probe items the effect is averaged over
    trial       str    the results table's trial; "base" for the base model
    step        i64    the checkpoint's optimizer step; 0 for the base model
    checkpoint  str    HF folder of the checkpoint; ``cfg.model.name`` for the base model
    item_delta  list[f64]  per probe item: LD_clean - LD_patched (masks: one pseudo-item, m_h)
    item_denominator  list[f64]  per probe item: LD_clean - LD_corrupt (masks: [1.0])

Method ``cmap`` (cross-model activation patching, ``dcv.circuits.patching.cmap_item_effects``) is a change
measure, not a circuit: its items (checkpoints only; the base against itself is 0 by construction) run as
a second stage ``cmap`` on the same actors' compute, after the others, with two models per actor (the
base kept beside the current checkpoint), and go to ``<storage>/patching/cmap.parquet``
(``dcv.tables.CMAP_SCHEMA``: these columns plus ``direction``; two rows per head), never into the effects
table the circuits stage reads. With ``patching.cmap_top_heads`` N a checkpoint's cmap item per probe holds
only the base's top N heads by |effect| of each circuit method (``cmap_on_top_heads``: ranked once the
other methods' base items are done), not every head.

The numbers come from ``dcv.circuits.patching.item_effects`` (the only patching implementation) and
``dcv.circuits.mask.mask_effects``. This module never starts Ray: ``run_pipeline`` needs a connected Ray
(``dcv patch-all`` and ``ray_jobs/patch.py`` connect it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import polars as pl

from dcv.circuits.methods import CMAP_DIRECTIONS, CROSS_MODEL_METHODS, circuit_methods, patching_method
from dcv.config import ExperimentConfig, select_probes
from dcv.models import model_head_grid
from dcv.results import list_models, read_results
from dcv.stages import WORK_COLUMNS, Progress, Stage, StageRun, log_stage, patching_resources, run_stage
from dcv.storage import (
    BASE_MODEL,
    CMAP_FILE,
    EFFECTS_FILE,
    content_hash,
    file_slug,
    items_dir,
    patching_dir,
    probe_key,
    read_parquet,
    storage_root,
    write_parquet,
)
from dcv.tables import CMAP_SCHEMA, EFFECTS_SCHEMA

# Entries every item's hash held before the method registry, None but for their own method: kept so that
# stored items stay valid (``build_item_id``). A new method's settings go in its record's ``keys`` only.
LEGACY_KEYS = ("ig_steps", "mask")

# The work grid: one row per item; heads are head_start..head_end-1 in (layer, head) order, or where
# head_index is not empty those flat indices (layer * n_heads + head): cmap on the top heads.
WORK_SCHEMA = {
    **WORK_COLUMNS,
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
    "head_index": pl.List(pl.Int32),
}


def item_path(storage_root: Path, item_id: str) -> Path:
    return items_dir(storage_root) / f"{item_id}.parquet"


def build_item_id(
    cfg: ExperimentConfig,
    model: str,
    checkpoint: str,
    probe: str,
    method: str,
    heads: tuple[int, int],
    head_index: Sequence[int] = (),
) -> str:
    """``<model>__<probe>__<method>__h<start>-<end>__<hash>`` (with ``head_index``, the item's own heads:
    ``__top<count>__``): stable across runs of the same config. The method's record
    (``dcv.circuits.methods``) adds the settings that key it."""
    record = patching_method(method)
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
        **({"head_index": [int(i) for i in head_index]} if len(head_index) else {}),
        **dict.fromkeys(LEGACY_KEYS),
        **record.cache_entries(cfg),
    }
    digest = content_hash(decides)
    span = f"top{len(head_index)}" if len(head_index) else f"h{heads[0]:05d}-{heads[1]:05d}"
    return f"{file_slug(model)}__{probe}__{method}__{span}__{digest}"


def model_items(
    cfg: ExperimentConfig,
    storage: Path,
    model: tuple[str, str, int, str],
    shape: tuple[int, int],
    probe: str,
    method: str,
) -> list[dict]:
    """The work rows (WORK_SCHEMA) of one model, probe and method, in head order: chunks of
    ``patching.head_chunk_size`` heads. ``model`` is (model id, trial, step, checkpoint)."""
    model_id, trial, step, checkpoint = model
    n_layers, n_heads = shape
    total = n_layers * n_heads
    record = patching_method(method)
    # One mask is learned over all heads together: a mask item is never split into chunks.
    chunk = total if record.whole_model else cfg.patching.head_chunk_size
    rows = []
    for start in range(0, total, chunk):
        heads = (start, min(start + chunk, total))
        item_id = build_item_id(cfg, model_id, checkpoint, probe, method, heads)
        rows.append(
            {
                "item_id": item_id,
                "path": str(item_path(storage, item_id)),
                # cmap: one row per head and direction.
                "n_rows": (heads[1] - heads[0]) * (len(CMAP_DIRECTIONS) if record.cross_model else 1),
                "model": model_id,
                "trial": trial,
                "step": step,
                "checkpoint": checkpoint,
                "probe": probe,
                "method": method,
                "head_start": heads[0],
                "head_end": heads[1],
                "n_layers": n_layers,
                "n_heads": n_heads,
                "head_index": [],
            }
        )
    return rows


def build_work_items(
    cfg: ExperimentConfig, results: pl.DataFrame, probes: Sequence[str] | None = None
) -> pl.DataFrame:
    """The work grid (WORK_SCHEMA), sorted by checkpoint, then probe, method and head range."""
    probe_names = select_probes(cfg, probes)
    models = list_models(cfg, results)
    storage = storage_root(cfg)
    rows = []
    for model, trial, step, checkpoint in models.iter_rows():
        model_cfg = cfg.model if model == BASE_MODEL else cfg.model.model_copy(update={"name": checkpoint})
        shape = model_head_grid(model_cfg)
        for probe in probe_names:
            for method in cfg.patching.methods:
                if patching_method(method).cross_model and model == BASE_MODEL:
                    continue  # the base against itself: 0 by construction
                rows += model_items(cfg, storage, (model, trial, step, checkpoint), shape, probe, method)
    return pl.DataFrame(rows, schema=WORK_SCHEMA).sort("checkpoint", "probe", "method", "head_start")


def item_heads(item: dict) -> list[tuple[int, int]]:
    """The item's heads as (layer, head), in (layer, head) order."""
    n_heads = int(item["n_heads"])
    flat = item.get("head_index")
    if flat is None or len(flat) == 0:
        flat = range(int(item["head_start"]), int(item["head_end"]))
    return [divmod(int(i), n_heads) for i in flat]


def cmap_on_top_heads(cfg: ExperimentConfig, cmap_work: pl.DataFrame, effects: pl.DataFrame) -> pl.DataFrame:
    """cmap's work with ``patching.cmap_top_heads`` N: per checkpoint and probe one item on the probe's
    top N base heads by |effect| (``rank_heads``, as the circuits stage ranks them), the union over the
    circuit methods of ``effects``, so every base circuit (at most top_k or k_max heads: the config
    refuses a smaller N) is inside."""
    from dcv.circuits.circuit import rank_heads

    n = cfg.patching.cmap_top_heads
    if n is None or cmap_work.is_empty():
        return cmap_work
    storage = storage_root(cfg)
    base = effects.filter(pl.col("model") == BASE_MODEL)
    methods = circuit_methods(cfg.patching.methods)
    top: dict[str, list[int]] = {}
    rows = []
    firsts = cmap_work.unique(["model", "probe", "method"], keep="first", maintain_order=True)
    for first in firsts.iter_rows(named=True):
        probe, n_heads = first["probe"], first["n_heads"]
        if probe not in top:
            chosen: set[tuple[int, int]] = set()
            for method in methods:
                ranked = rank_heads(base.filter((pl.col("probe") == probe) & (pl.col("method") == method)))
                if not ranked:
                    raise ValueError(
                        f"patching.cmap_top_heads: the base model has no {method} effects on {probe} to rank "
                        "its heads by (the base must be in the patching work)"
                    )
                chosen |= set(ranked[:n])
            top[probe] = sorted(layer * n_heads + head for layer, head in chosen)
        index = top[probe]
        heads = (index[0], index[-1] + 1)
        model, checkpoint = first["model"], first["checkpoint"]
        item_id = build_item_id(cfg, model, checkpoint, probe, first["method"], heads, index)
        rows.append(
            {
                **first,
                "item_id": item_id,
                "path": str(item_path(storage, item_id)),
                "n_rows": len(index) * len(CMAP_DIRECTIONS),
                "head_start": heads[0],
                "head_end": heads[1],
                "head_index": index,
            }
        )
    return pl.DataFrame(rows, schema=WORK_SCHEMA)


def read_item(path: Path, n_rows: int) -> pl.DataFrame | None:
    """A finished item's rows, or None when the file is absent or invalid: unreadable, of another schema
    or size (then it is moved aside, ``dcv.storage.read_parquet``, and the item is patched again)."""
    return read_parquet(path, EFFECTS_SCHEMA, n_rows)


def compute_item(model, items: Sequence, item: dict, cfg: ExperimentConfig) -> pl.DataFrame:
    """One item's rows (EFFECTS_SCHEMA) of a method run on one model: its record's compute
    (``dcv.circuits.methods``)."""
    return patching_method(str(item["method"])).compute_function()(None, model, items, item, cfg)


def compute_patched_item(base, model, items: Sequence, item: dict, cfg: ExperimentConfig) -> pl.DataFrame:
    """A ranking method's rows (EFFECTS_SCHEMA): ``item_effects`` on the item's heads (``base`` unused)."""
    from dcv.circuits.patching import effects_table, item_effects

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
    denominator = [effects.denominator.double().tolist()] * table.height
    return item_rows(table, item, effects.delta.double().tolist(), denominator).select(list(EFFECTS_SCHEMA))


def compute_mask_item(base, model, items: Sequence, item: dict, cfg: ExperimentConfig) -> pl.DataFrame:
    """Learned masks' rows (EFFECTS_SCHEMA): one mask over the item's heads (``base`` unused)."""
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
    return item_rows(table, item, delta, denominator).select(list(EFFECTS_SCHEMA))


def item_rows(table: pl.DataFrame, item: dict, delta: list, denominator: list) -> pl.DataFrame:
    """``table`` (one effect per head) with the item's model columns and its per-item parts."""
    return table.with_columns(
        pl.lit(str(item["trial"]), pl.String).alias("trial"),
        pl.lit(int(item["step"]), pl.Int64).alias("step"),
        pl.lit(str(item["checkpoint"]), pl.String).alias("checkpoint"),
        pl.Series("item_delta", delta, dtype=pl.List(pl.Float64)),
        pl.Series("item_denominator", denominator, dtype=pl.List(pl.Float64)),
    )


def compute_cmap_item(base, model, items: Sequence, item: dict, cfg: ExperimentConfig) -> pl.DataFrame:
    """One cmap item's rows (CMAP_SCHEMA): ``cmap_item_effects`` of the checkpoint ``model`` against
    ``base`` on the item's heads, every head once per direction (CMAP_DIRECTIONS order)."""
    from dcv.circuits.patching import cmap_item_effects, effects_table

    by_direction = cmap_item_effects(
        base,
        model,
        items,
        heads=item_heads(item),
        batch_size=cfg.patching.batch_size,
        head_chunk_size=cfg.patching.head_chunk_size,
    )
    tables = []
    for direction, effects in by_direction.items():
        table = effects_table(effects, str(item["model"]), str(item["probe"]), str(item["method"]))
        denominator = [effects.denominator.double().tolist()] * table.height
        rows = item_rows(table, item, effects.delta.double().tolist(), denominator)
        tables.append(
            rows.with_columns(pl.lit(direction, pl.String).alias("direction")).select(list(CMAP_SCHEMA))
        )
    return pl.concat(tables)


def patch_item(worker, item: dict, probe_items: dict[str, list]) -> pl.DataFrame:
    """The stage's compute (``dcv.stages``): one item's rows on the actor's model for its checkpoint
    (cmap: with the actor's base model beside it)."""
    from dcv.circuits.decoder import model_shape

    model = worker.model(item["model"], item["checkpoint"])
    shape = model_shape(model)
    if (shape.n_layers, shape.n_heads) != (item["n_layers"], item["n_heads"]):
        raise ValueError(
            f"checkpoint {item['checkpoint']}: {shape.n_layers} layers x {shape.n_heads} heads, but its "
            f"config.json said {item['n_layers']} x {item['n_heads']}"
        )
    record = patching_method(str(item["method"]))
    base = worker.base_model() if record.cross_model else None
    return record.compute_function()(base, model, probe_items[item["probe"]], item, worker.cfg)


def patching_stage(cfg: ExperimentConfig, work: pl.DataFrame) -> Stage:
    """The patching stage of a work grid: the probes' items are built once, here, for every actor."""
    from dcv.models import load_tokenizer
    from dcv.tasks.probes import build_probe

    names = work["probe"].unique().to_list()
    probe_items = {}
    if names:
        tokenizer = load_tokenizer(cfg.model)
        probe_items = {n: list(build_probe(cfg.probe(n), tokenizer, cfg.target_task).items) for n in names}
    return Stage("patching", cfg, work, EFFECTS_SCHEMA, patch_item, patching_resources(cfg), probe_items)


def cmap_stage(cfg: ExperimentConfig, work: pl.DataFrame) -> Stage:
    """The cmap items of a work grid as their own stage: same actors and compute, CMAP_SCHEMA files."""
    return replace(patching_stage(cfg, work), name="cmap", schema=CMAP_SCHEMA)


def run_pipeline(
    cfg: ExperimentConfig,
    probes: Sequence[str] | None = None,
    progress: Progress = print,
    work: pl.DataFrame | None = None,
    out: Path | None = None,
) -> StageRun:
    """Patch every unfinished item (``dcv.stages.run_stage``), then assemble and write the table.

    ``work`` is the grid (default: every model of the sweep's results table); the assembled table goes to
    ``out`` (default ``<storage>/patching/effects.parquet``), named by the returned run's ``path``. Needs a
    connected Ray. Everything that can fail on bad input (results table, checkpoint folders, probe names,
    the pool against the cluster) fails before any actor starts.
    """
    import ray

    from dcv.stages import check_resources

    if not ray.is_initialized():
        raise RuntimeError("run_pipeline needs a connected Ray (ray.init); dcv patch-all connects one")
    storage = storage_root(cfg)
    work = build_work_items(cfg, read_results(storage), probes) if work is None else work
    check_resources("patching", patching_resources(cfg), ray.cluster_resources())
    cross_model = pl.col("method").is_in(CROSS_MODEL_METHODS)
    cmap_work = work.filter(cross_model)
    run = run_stage(patching_stage(cfg, work.filter(~cross_model)), progress)
    table = run.table.sort("checkpoint", "model", "probe", "method", "layer", "head")
    path = write_parquet(table, patching_dir(storage) / EFFECTS_FILE if out is None else out)
    if cmap_work.height:
        # After the patching items (with cmap_top_heads, cmap's heads are ranked on the base's effects): a
        # fresh pool, each actor loading the base once beside each checkpoint.
        cmap_work = cmap_on_top_heads(cfg, cmap_work, table)
        cmap = run_stage(cmap_stage(cfg, cmap_work), progress)
        cmap_table = cmap.table.sort("checkpoint", "model", "probe", "direction", "layer", "head")
        write_parquet(cmap_table, path.with_name(CMAP_FILE))
        run = replace(
            run,
            total=run.total + cmap.total,
            skipped=run.skipped + cmap.skipped,
            computed=run.computed + cmap.computed,
            model_loads=run.model_loads + cmap.model_loads,
            seconds=run.seconds + cmap.seconds,
        )
    return replace(run, table=table, path=path)


def log_pipeline_run(cfg: ExperimentConfig, run: StageRun) -> None:
    """The run's counts and its effects table in the experiment's ``patch-all`` MLflow child run (tag
    dcv.stage=patch)."""
    log_stage(cfg, "patch-all", "patch", run, run.path)
