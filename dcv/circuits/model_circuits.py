"""The circuits stage: every model's own circuit per probe, and how faithful the base circuit stays in it.

For each model of the patching table (the base model and every checkpoint), probe and patching method:

- the model's own circuit C_T(M) (``select_circuit`` on M's own head effects), its size and faithfulness;
- F(C_T(base), M): the base circuit's faithfulness in M (docs/method.md "Circuits and faithfulness");
- the faithfulness curve F(C_k(base), M) of the base ranking's top k heads over
  ``circuits.curve_fractions`` (``dcv.circuits.curves``; ranking methods only), in the same row.

Both need the model's forward passes, so they run where the model is: one item per model on the stage
runner's actor pool (``dcv.stages``; CPU or GPU as ``patching`` asks), the base model first (its circuits
are the reference the others are scored against), then the checkpoints, then the learned masks' noise
floor when masks are configured. One file per model, ``<storage>/circuits/models/<model>__<hash>.parquet``
(CIRCUITS_SCHEMA), written atomically; the hash covers the checkpoint, the circuit rule, the probes (with
``chem``, the target task its items come from) and, for checkpoints, the base circuits, so a rerun skips
finished models and a changed config recomputes. The assembled table is
``<storage>/circuits/circuits.parquet``, its curves also as ``faithfulness_curves.parquet`` (one row per
point, FAITHFULNESS_CURVES_SCHEMA).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import polars as pl

from dcv.circuits.methods import MASK_METHODS, RANKING_METHODS, circuit_methods, patching_method
from dcv.config import ExperimentConfig
from dcv.stages import WORK_COLUMNS, Progress, Stage, patching_resources, run_stage
from dcv.storage import (
    BASE_MODEL,
    CIRCUITS_FILE,
    FAITHFULNESS_CURVES_FILE,
    NOISE_FLOOR_FILE,
    circuits_dir,
    content_hash,
    file_slug,
    write_parquet,
)
from dcv.tables import CIRCUITS_SCHEMA, Head, base_circuits, faithfulness_curves


def model_circuits(
    model,
    probe_items: dict[str, list],
    effects: pl.DataFrame,
    cfg: ExperimentConfig,
    reference: dict[tuple[str, str], list[Head]] | None,
    rankings: dict[tuple[str, str], list[Head]] | None = None,
    fractions: Sequence[float] = (),
) -> pl.DataFrame:
    """CIRCUITS_SCHEMA rows of one model: one per (probe, method) in its ``effects``.

    ``reference`` holds the base circuits; None means this model is the base (F of its own circuit).
    ``rankings`` holds the base model's heads by |effect| per (probe, method), the curves' top-k order (the
    base model ranks by its own effects without it); no ``fractions``: no curves (empty lists).
    """
    from dcv.circuits.circuit import Circuit, faithfulness, rank_heads, select_circuit
    from dcv.circuits.curves import faithfulness_curve
    from dcv.circuits.mask import mask_circuit

    rows = []
    keys = effects.select("model", "trial", "step", "probe", "method").unique().sort("probe", "method")
    for model_id, trial, step, probe, method in keys.iter_rows():
        table = effects.filter((pl.col("probe") == probe) & (pl.col("method") == method))
        items = probe_items[probe]
        ranks_heads = patching_method(method).ranks_heads
        if not ranks_heads:
            # A method that ranks no heads gives its circuit as a set: the learned masks are the circuit
            # ({h : m_h >= 0.5}); faithfulness scores it like any other.
            heads = mask_circuit(table)
            f = faithfulness(model, items, [set(heads)], cfg.patching.batch_size)[0] if heads else 0.0
            circuit = Circuit(probe, tuple(heads), f, f >= cfg.circuits.tau, (f,))
        else:
            circuit = select_circuit(model, items, table, cfg.circuits, batch_size=cfg.patching.batch_size)
        if reference is None:
            base_f = circuit.faithfulness
        else:
            base_f = faithfulness(model, items, [set(reference[(probe, method)])], cfg.patching.batch_size)[0]
        sizes, curve = [], []
        if fractions and ranks_heads:
            ranking = rank_heads(table) if reference is None else (rankings or {}).get((probe, method))
            if ranking is None:
                raise ValueError(f"model_circuits: no base ranking for probe {probe!r}, method {method!r}")
            sizes, curve = faithfulness_curve(model, items, ranking, fractions, cfg.patching.batch_size)
        rows.append(
            {
                "model": model_id,
                "trial": trial,
                "step": step,
                "probe": probe,
                "method": method,
                "size": len(circuit),
                "faithfulness": circuit.faithfulness,
                "reached_tau": circuit.reached_tau,
                "base_circuit_faithfulness": base_f,
                "layers": [layer for layer, _ in circuit.heads],
                "heads": [head for _, head in circuit.heads],
                "curve_fractions": list(fractions) if sizes else [],
                "curve_k": sizes,
                "curve_faithfulness": curve,
            }
        )
    return pl.DataFrame(rows, schema=CIRCUITS_SCHEMA)


def model_file(
    cfg: ExperimentConfig,
    storage_root: Path,
    model: str,
    checkpoint: str,
    reference,
    fractions: Sequence[float] | None = None,
) -> Path:
    """A model's circuits file, named by what decides it. ``fractions``: the curves' grid as computed (a
    caller may turn them off); None for a file without curves (the masks' noise floor), whose name then
    stays what it was before the curves existed."""
    probe_names = {p.name for p in cfg.probes}
    decides = {
        "checkpoint": checkpoint,
        "model_config": cfg.model.model_dump(mode="json", exclude={"cache_dir"}),
        "circuits": cfg.circuits.model_dump(mode="json", exclude={"curve_fractions"}),
        "probes": [p.model_dump(mode="json") for p in cfg.probes],
        # chem's items are the target task's questions: a changed target task changes its circuits.
        **({"target_task": cfg.target_task.model_dump(mode="json")} if "chem" in probe_names else {}),
        # cmap finds no circuit: adding it to a finished run must not redo the circuits.
        "methods": circuit_methods(cfg.patching.methods),
        "reference": None
        if reference is None
        else sorted((f"{p}/{m}", h) for (p, m), h in reference.items()),
    }
    if fractions is not None:
        decides["curve_fractions"] = list(fractions)  # also renames every file of the schema with curves
    digest = content_hash(decides)
    return circuits_dir(storage_root) / "models" / f"{file_slug(model)}__{digest}.parquet"


def circuits_item(worker, item: dict, context: dict) -> pl.DataFrame:
    """The stage's compute (``dcv.stages``): one model's CIRCUITS_SCHEMA rows."""
    model = worker.model(item["model"], item["checkpoint"])
    effects = context["effects"].filter(pl.col("model") == item["model"])
    return model_circuits(
        model,
        context["probe_items"],
        effects,
        worker.cfg,
        context["reference"],
        context.get("rankings"),
        context.get("curve_fractions", ()),
    )


def noise_floor_item(worker, item: dict, context: dict) -> pl.DataFrame:
    """The learned masks' noise floor (``dcv.circuits.noise_floor.mask_noise_floor``) on the base model.
    The patching methods' floor needs no model (``dcv.analysis``)."""
    from dcv.circuits.noise_floor import mask_noise_floor

    model = worker.model(BASE_MODEL, item["checkpoint"])
    return mask_noise_floor(model, context["probe_items"], context["masks"], context["reference"], worker.cfg)


def _work(rows: list[dict]) -> pl.DataFrame:
    schema = {**WORK_COLUMNS, "model": pl.String, "checkpoint": pl.String}
    return pl.DataFrame(rows, schema=schema)


def run_circuits(
    cfg: ExperimentConfig,
    effects: pl.DataFrame,
    storage_root: Path,
    progress: Progress = print,
    out_dir: Path | None = None,
    curves: bool = True,
) -> pl.DataFrame:
    """Every model's circuits (base first, then the checkpoints, then the learned masks' noise floor when
    ``circuits.noise_floor`` and masks are configured) on the stage runner; needs Ray. The assembled
    tables go to ``out_dir`` (default ``<storage>/circuits``); per-model files are shared by every caller.
    ``curves=False`` skips the faithfulness curves whatever ``circuits.curve_fractions`` says."""
    from dcv.circuits.circuit import rank_heads
    from dcv.circuits.noise_floor import NOISE_FLOOR_SCHEMA
    from dcv.models import load_tokenizer
    from dcv.tasks.probes import build_probe

    models = effects.select("model", "checkpoint").unique().sort("model")
    if BASE_MODEL not in models["model"].to_list():
        raise ValueError("the patching table has no base-model rows; rerun the patching stage")
    base_masks = effects.filter((pl.col("model") == BASE_MODEL) & pl.col("method").is_in(MASK_METHODS))
    effects = effects.drop("item_delta", "item_denominator", strict=False)
    # A model's file holds one row per (probe, method) it was patched on (calibration models: one probe).
    n_rows = dict(effects.group_by("model").agg(pl.struct("probe", "method").n_unique()).iter_rows())
    tokenizer = load_tokenizer(cfg.model)
    probe_items = {
        name: list(build_probe(cfg.probe(name), tokenizer, cfg.target_task).items)
        for name in effects["probe"].unique().to_list()
    }
    resources = patching_resources(cfg)

    def item(
        model: str, checkpoint: str, reference, rows: int | None, grid: Sequence[float] | None = None
    ) -> dict:
        path = model_file(cfg, storage_root, model, checkpoint, reference, grid)
        return {
            "item_id": path.stem,
            "path": str(path),
            "n_rows": rows,
            "model": model,
            "checkpoint": checkpoint,
        }

    def run(name: str, compute, items: list[dict], context: dict, schema: dict) -> pl.DataFrame:
        return run_stage(Stage(name, cfg, _work(items), schema, compute, resources, context), progress).table

    base_checkpoint = models.filter(pl.col("model") == BASE_MODEL)["checkpoint"][0]
    fractions = list(cfg.circuits.curve_fractions) if curves else []
    base_effects = effects.filter((pl.col("model") == BASE_MODEL) & pl.col("method").is_in(RANKING_METHODS))
    rankings = {
        (probe, method): rank_heads(frame)
        for (probe, method), frame in base_effects.group_by("probe", "method")
    }
    context = {
        "effects": effects,
        "probe_items": probe_items,
        "reference": None,
        "rankings": rankings,
        "curve_fractions": fractions,
    }
    # The base model first: its circuits are the reference every checkpoint is scored against.
    base_item = item(BASE_MODEL, base_checkpoint, None, n_rows[BASE_MODEL], fractions)
    base = run("circuits (base model)", circuits_item, [base_item], context, CIRCUITS_SCHEMA)
    reference = base_circuits(base)
    items = [item(m, c, reference, n_rows[m], fractions) for m, c in models.iter_rows() if m != BASE_MODEL]
    checkpoints = run("circuits", circuits_item, items, {**context, "reference": reference}, CIRCUITS_SCHEMA)
    table = pl.concat([base, checkpoints]).sort("model", "probe", "method")
    out_dir = circuits_dir(storage_root) if out_dir is None else out_dir
    write_parquet(table, out_dir / CIRCUITS_FILE)
    write_parquet(faithfulness_curves(table), out_dir / FAITHFULNESS_CURVES_FILE)
    floor = pl.DataFrame(schema=NOISE_FLOOR_SCHEMA)
    if cfg.circuits.noise_floor and not base_masks.is_empty():
        masks = {"probe_items": probe_items, "masks": base_masks, "reference": reference}
        floor_item = item("noise_floor", base_checkpoint, reference, None)
        floor = run("noise floor (masks)", noise_floor_item, [floor_item], masks, NOISE_FLOOR_SCHEMA)
    write_parquet(floor, out_dir / NOISE_FLOOR_FILE)
    return table
