"""The circuits stage: every model's own circuit per probe, and how faithful the base circuit stays in it.

For each model of the patching table (the base model and every checkpoint), probe and patching method:

- the model's own circuit C_T(M) (``select_circuit`` on M's own head effects), its size and faithfulness;
- F(C_T(base), M): the base circuit's faithfulness in M (DESIGN.md, "Preservation").

Both need the model's forward passes, so they run where the model is: one Ray task per model (CPU or GPU
as ``patching`` asks), the base model first (its circuits are the reference the others are scored
against). One file per model, ``<storage>/circuits/models/<model>__<hash>.parquet`` (CIRCUITS_SCHEMA),
written atomically; the hash covers the checkpoint, the circuit rule, the probes (with ``chem``, the
target task its items come from) and, for checkpoints, the base circuits, so a rerun skips finished
models and a changed config recomputes. The assembled table is ``<storage>/circuits/circuits.parquet``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import polars as pl

from dcv.circuits import MASK, Head
from dcv.circuits.pipeline import wait_for_tasks
from dcv.config import ExperimentConfig, parse_config
from dcv.storage import (
    BASE_MODEL,
    CIRCUITS_FILE,
    NOISE_FLOOR_FILE,
    circuits_dir,
    content_hash,
    file_slug,
    read_parquet,
    write_parquet,
)
from dcv.tables import CIRCUITS_SCHEMA, base_circuits


def model_circuits(
    model,
    probe_items: dict[str, list],
    effects: pl.DataFrame,
    cfg: ExperimentConfig,
    reference: dict[tuple[str, str], list[Head]] | None,
) -> pl.DataFrame:
    """CIRCUITS_SCHEMA rows of one model: one per (probe, method) in its ``effects``.

    ``reference`` holds the base circuits; None means this model is the base (F of its own circuit).
    """
    from dcv.circuits.circuit import Circuit, faithfulness, select_circuit
    from dcv.circuits.mask import mask_circuit

    rows = []
    keys = effects.select("model", "trial", "step", "probe", "method").unique().sort("probe", "method")
    for model_id, trial, step, probe, method in keys.iter_rows():
        table = effects.filter((pl.col("probe") == probe) & (pl.col("method") == method))
        items = probe_items[probe]
        if method == MASK:
            # The learned masks are the circuit ({h : m_h >= 0.5}); faithfulness scores it like any other.
            heads = mask_circuit(table)
            f = faithfulness(model, items, [set(heads)], cfg.patching.batch_size)[0] if heads else 0.0
            circuit = Circuit(probe, tuple(heads), f, f >= cfg.circuits.tau, (f,))
        else:
            circuit = select_circuit(model, items, table, cfg.circuits, batch_size=cfg.patching.batch_size)
        if reference is None:
            base_f = circuit.faithfulness
        else:
            base_f = faithfulness(model, items, [set(reference[(probe, method)])], cfg.patching.batch_size)[0]
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
            }
        )
    return pl.DataFrame(rows, schema=CIRCUITS_SCHEMA)


def model_file(cfg: ExperimentConfig, storage_root: Path, model: str, checkpoint: str, reference) -> Path:
    probe_names = {p.name for p in cfg.probes}
    decides = {
        "checkpoint": checkpoint,
        "model_config": cfg.model.model_dump(mode="json", exclude={"cache_dir"}),
        "circuits": cfg.circuits.model_dump(mode="json"),
        "probes": [p.model_dump(mode="json") for p in cfg.probes],
        # chem's items are the target task's questions: a changed target task changes its circuits.
        **({"target_task": cfg.target_task.model_dump(mode="json")} if "chem" in probe_names else {}),
        "methods": cfg.patching.methods,
        "reference": None
        if reference is None
        else sorted((f"{p}/{m}", h) for (p, m), h in reference.items()),
    }
    digest = content_hash(decides)
    return circuits_dir(storage_root) / "models" / f"{file_slug(model)}__{digest}.parquet"


def _finished(path: Path, schema: dict, n_rows: int | None) -> pl.DataFrame | None:
    """The table at ``path`` if it is complete (the schema, and ``n_rows`` rows unless None); an
    invalid file is moved aside and computed again (``dcv.storage.read_parquet``)."""
    return read_parquet(path, schema, n_rows)


def compute_model_circuits(
    cfg_dict: dict,
    model: str,
    checkpoint: str,
    effects: pl.DataFrame,
    probe_items: dict[str, list],
    reference: dict[tuple[str, str], list[Head]] | None,
    path: str,
) -> int:
    """One model's circuits, written to ``path``: the body of a Ray task."""
    import torch

    from dcv.circuits.pipeline import load_item_model

    cfg = parse_config(cfg_dict)
    torch.set_num_threads(max(1, int(cfg.patching.num_cpus_per_actor)))
    device = "cuda" if cfg.patching.num_gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
    loaded = load_item_model(cfg, model, checkpoint).to(device)
    table = model_circuits(loaded, probe_items, effects, cfg, reference)
    write_parquet(table, Path(path))
    return table.height


def compute_noise_floor(
    cfg_dict: dict,
    checkpoint: str,
    effects: pl.DataFrame,
    probe_items: dict[str, list],
    reference: dict[tuple[str, str], list[Head]],
    path: str,
) -> int:
    """The learned masks' noise floor (``dcv.circuits.noise_floor.mask_noise_floor``), written to
    ``path``: a Ray task. The patching methods' floor needs no model (``dcv.analysis``)."""
    import torch

    from dcv.circuits.noise_floor import mask_noise_floor
    from dcv.circuits.pipeline import load_item_model

    cfg = parse_config(cfg_dict)
    torch.set_num_threads(max(1, int(cfg.patching.num_cpus_per_actor)))
    device = "cuda" if cfg.patching.num_gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
    model = load_item_model(cfg, BASE_MODEL, checkpoint).to(device)
    table = mask_noise_floor(model, probe_items, effects, reference, cfg)
    write_parquet(table, Path(path))
    return table.height


def run_circuits(
    cfg: ExperimentConfig,
    effects: pl.DataFrame,
    storage_root: Path,
    progress: Callable[[str], None] = print,
    out_dir: Path | None = None,
) -> pl.DataFrame:
    """Every model's circuits (base first, then the checkpoints in parallel Ray tasks, beside them the
    learned masks' noise floor when ``circuits.noise_floor``); needs Ray. The assembled tables go to
    ``out_dir`` (default ``<storage>/circuits``); per-model files are shared by every caller."""
    import ray

    from dcv.circuits.noise_floor import NOISE_FLOOR_SCHEMA
    from dcv.models import load_tokenizer
    from dcv.tasks.probes import build_probe

    models = effects.select("model", "checkpoint").unique().sort("model")
    if BASE_MODEL not in models["model"].to_list():
        raise ValueError("the patching table has no base-model rows; rerun the patching stage")
    base_masks = effects.filter((pl.col("model") == BASE_MODEL) & (pl.col("method") == MASK))
    effects = effects.drop("item_delta", "item_denominator", strict=False)
    # A model's file holds one row per (probe, method) it was patched on (calibration models: one probe).
    n_rows = dict(effects.group_by("model").agg(pl.struct("probe", "method").n_unique()).iter_rows())
    tokenizer = load_tokenizer(cfg.model)
    probes = effects["probe"].unique().to_list()
    probe_items = {
        name: list(build_probe(cfg.probe(name), tokenizer, cfg.target_task).items) for name in probes
    }
    resources = {"num_cpus": cfg.patching.num_cpus_per_actor, "num_gpus": cfg.patching.num_gpus_per_actor}
    task = ray.remote(compute_model_circuits).options(**resources)

    def launch(model: str, checkpoint: str, reference) -> tuple[Path, object | None]:
        path = model_file(cfg, storage_root, model, checkpoint, reference)
        if _finished(path, CIRCUITS_SCHEMA, n_rows[model]) is not None:
            return path, None
        rows = effects.filter(pl.col("model") == model)
        return path, task.remote(
            cfg.model_dump(mode="json"), model, checkpoint, rows, probe_items, reference, str(path)
        )

    base_checkpoint = models.filter(pl.col("model") == BASE_MODEL)["checkpoint"][0]
    base_path, base_ref = launch(BASE_MODEL, base_checkpoint, None)
    if base_ref is not None:
        progress("circuits: base model first (the reference for every checkpoint)")
        ray.get(base_ref)
    reference = base_circuits(pl.read_parquet(base_path))
    launched = [launch(m, c, reference) for m, c in models.iter_rows() if m != BASE_MODEL]
    floor_path = model_file(cfg, storage_root, "noise_floor", base_checkpoint, reference)
    masks_floor = cfg.circuits.noise_floor and not base_masks.is_empty()
    if masks_floor:
        if _finished(floor_path, NOISE_FLOOR_SCHEMA, None) is None:
            args = (cfg.model_dump(mode="json"), base_checkpoint, base_masks, probe_items, reference)
            task_ref = ray.remote(compute_noise_floor).options(**resources).remote(*args, str(floor_path))
            launched.append((floor_path, task_ref))
        else:
            launched.append((floor_path, None))
    n_jobs = 1 + len(launched)
    pending = [ref for _, ref in launched if ref is not None]
    skipped = int(base_ref is None) + len(launched) - len(pending)
    progress(f"circuits: {n_jobs} jobs (models and noise floor), {skipped} finished before (skipped)")
    wait_for_tasks(pending, "circuits", n_jobs, progress)
    paths = [base_path] + [path for path, _ in launched if path != floor_path]
    table = pl.concat([pl.read_parquet(path) for path in paths]).sort("model", "probe", "method")
    out_dir = circuits_dir(storage_root) if out_dir is None else out_dir
    write_parquet(table, out_dir / CIRCUITS_FILE)
    floor = read_parquet(floor_path) if masks_floor else None
    floor = pl.DataFrame(schema=NOISE_FLOOR_SCHEMA) if floor is None else floor
    write_parquet(floor, out_dir / NOISE_FLOOR_FILE)
    return table
