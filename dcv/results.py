"""The results table: one row per (trial, evaluated checkpoint). The contract later stages read.

The sweep writes it (``<storage>/results/checkpoints.parquet``, and ``.csv`` without the list columns);
the patching pipeline takes its work items from it and the analysis joins its rows. Fixed columns:

    trial           str    trial name (``<method>-lr<lr>-seed<seed>[-<grid suffix>]``), unique per sweep
    method          str    "sft" | "rl"
    learning_rate   f64
    seed            i64
    init            str    where the trial started: "base" (or "sft:<trial>@<step>" for RL after SFT)
    step            i64    optimizer step of the checkpoint; 0 is the base model's weights
    checkpoint      str    path of the HF-format checkpoint folder (loadable with ``from_pretrained``)

then one f64 column per evaluated metric, named as the trial's MLflow metric (``target/accuracy``,
``target/format_rate``, ``probe/<name>/accuracy``, ``probe/<name>/mean_ld``, ``kl_to_base``,
``train/loss`` for SFT, ``train/reward`` for RL; null where a method or step has none), and after the
benchmarks stage one column per lm-eval score, ``bench/<task>/<metric>`` (``dcv.benchmarks``).

Then the per-item scores behind the means, for the analysis' bootstrap over items (parquet only), from
each checkpoint's ``item_scores`` (``dcv.evaluation.evaluate_model_scores``):

    target/item_correct     list[f64]   1.0 / 0.0 per target test item, in test-item order; its mean is
                                        ``target/accuracy``
    probe/<name>/item_ld    list[f64]   LD_clean per probe item, in probe-item order; its mean is
                                        ``probe/<name>/mean_ld``, its share > 0 ``probe/<name>/accuracy``

null in rows whose checkpoint has none (runs from before they were kept); absent when no row has them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import polars as pl

from dcv.storage import (
    BASE_MODEL,
    RESULTS_FILE,
    StoragePath,
    as_path,
    atomic_path,
    checkpoint_model,
    read_parquet,
    results_dir,
    write_parquet,
)

if TYPE_CHECKING:
    from dcv.config import ExperimentConfig

KEY_COLUMNS = ("trial", "method", "learning_rate", "seed", "init", "step", "checkpoint")
KEY_SCHEMA = {
    "trial": pl.String,
    "method": pl.String,
    "learning_rate": pl.Float64,
    "seed": pl.Int64,
    "init": pl.String,
    "step": pl.Int64,
    "checkpoint": pl.String,
}
# The metrics also carry the step, which is already a key column.
DROPPED_METRICS = ("step",)


def item_column(key: str) -> str:
    """The list column of a checkpoint's ``item_scores`` key: ``target/correct`` -> ``target/item_correct``,
    ``probe/<name>/ld`` -> ``probe/<name>/item_ld``."""
    head, _, last = key.rpartition("/")
    return f"{head}/item_{last}"


def build_results_table(rows: Iterable[Mapping[str, Any]]) -> pl.DataFrame:
    """A table from rows holding the key columns plus a ``metrics`` mapping and optionally an
    ``item_scores`` one (lists of floats); sorted by trial and step."""
    records, item_names = [], set()
    for row in rows:
        missing = [c for c in KEY_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"results row {dict(row)!r}: missing key columns {missing}")
        metrics = {k: float(v) for k, v in row.get("metrics", {}).items() if k not in DROPPED_METRICS}
        items = {item_column(k): [float(x) for x in v] for k, v in (row.get("item_scores") or {}).items()}
        item_names |= items.keys()
        records.append({**{c: row[c] for c in KEY_COLUMNS}, **metrics, **items})
    metric_names = sorted({k for r in records for k in r} - set(KEY_COLUMNS) - item_names)
    schema = {
        **KEY_SCHEMA,
        **dict.fromkeys(metric_names, pl.Float64),
        **dict.fromkeys(sorted(item_names), pl.List(pl.Float64)),
    }
    table = pl.DataFrame(records, schema=schema) if records else pl.DataFrame(schema=schema)
    return table.sort("trial", "step")


def write_results(table: pl.DataFrame, storage_root: StoragePath) -> StoragePath:
    """Write the table as parquet and CSV (each atomically); returns the parquet path. CSV has no list
    type: it leaves the per-item columns out (the parquet holds them)."""
    folder = results_dir(storage_root)
    path = write_parquet(table, folder / RESULTS_FILE)
    with atomic_path(folder / "checkpoints.csv") as tmp:
        table.select(pl.exclude(pl.List)).write_csv(tmp)
    return path


def read_results(storage_root: StoragePath) -> pl.DataFrame:
    """The sweep's results table; a clear error when the sweep has not written it yet."""
    path = results_dir(storage_root) / RESULTS_FILE
    table = read_parquet(path)
    if table is None:
        raise FileNotFoundError(f"{path}: no results table; run the sweep first (dcv sweep CONFIG)")
    missing = [c for c in KEY_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: not a dcv results table (missing columns {missing})")
    return table


# The models a results table names: the base model and every checkpoint, by model id.
MODELS_SCHEMA = {"model": pl.String, "trial": pl.String, "step": pl.Int64, "checkpoint": pl.String}


def list_models(cfg: ExperimentConfig, results: pl.DataFrame) -> pl.DataFrame:
    """The base model and every results-table checkpoint (model, trial, step, checkpoint); a missing
    checkpoint folder is an error naming the path and its row. A trial's step 0 from ``init`` "base" is
    the base model, not patched again."""
    rows = [{"model": BASE_MODEL, "trial": BASE_MODEL, "step": 0, "checkpoint": cfg.model.name}]
    # Step 0 of a trial is the model it started from: the base model, or an SFT checkpoint that is usually
    # its own trial's row (listed from a step-0 row only when that trial is not in the table).
    listed = results.select(pl.concat_str("trial", pl.lit("@"), "step")).to_series().to_list()
    for trial, step, checkpoint, init in results.select("trial", "step", "checkpoint", "init").iter_rows():
        model = checkpoint_model(trial, step, init)
        if model == BASE_MODEL or (step == 0 and model in listed):
            continue
        if step == 0:
            trial, step = model.rsplit("@", 1)[0], int(model.rsplit("@", 1)[1])
            listed.append(model)
        folder = as_path(os.path.expanduser(checkpoint))  # a local folder or one on an object store
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"results table row trial={trial!r} step={step}: checkpoint={checkpoint!r} is not an HF "
                f"model folder ({folder / 'config.json'} is missing); rerun the sweep or fix the table"
            )
        rows.append({"model": model, "trial": trial, "step": step, "checkpoint": checkpoint})
    models = pl.DataFrame(rows, schema=MODELS_SCHEMA)
    duplicated = models.filter(pl.col("model").is_duplicated())["model"].unique().to_list()
    if duplicated:
        raise ValueError(f"results table: (trial, step) appears more than once: {duplicated}")
    return models
