"""Calibration: planted damage on the base model, measured by the same patching, circuits and analysis.

An instrument is trusted once it finds damage put there on purpose, and once it could have failed to
(docs/method.md "Calibration: controls that can fail"). Per probe, for k in ``calibration.k`` and alpha in
``calibration.alphas``:

- graded positive controls: the top-k heads of the base circuit with their ``o_proj`` input columns
  scaled by alpha (0 ablates, 0.5 halves);
- random plants: k random heads outside the circuit, scaled by the same alpha;
- a negative control that can fail (kind ``precision``, once for every probe): the base at numerical
  precision, float32 weights cast to bfloat16 and back (16-bit weights: one unit in the last place up
  or down), which must not be flagged and is when the instrument is over-sensitive.

Each planted model is an HF folder under ``<storage>/calibration/models/`` (named with its alpha) and
goes through the patching pipeline (``run_pipeline``) and the circuits stage (``run_circuits``) exactly as
a fine-tuned checkpoint does; its numbers come from ``dcv.matched.probe_numbers``, the function every
checkpoint's numbers come from. The table (``<storage>/calibration/calibration.parquet``,
CALIBRATION_SCHEMA) is long: one row per (probe, plant, metric) for the metrics in CALIBRATION_METRICS.
Each row has the metric's value with its item-bootstrap CI (the same item draws for every plant) and:

- ``detected``: the CI lies beyond the base model's own value in the metric's damage direction
  (``dcv.metrics``) and the change exceeds the metric's noise margin (``noise_margin``,
  ``dcv.detection.noise_margins``); on the precision copy a detection is a false positive (``flagged``
  adds P below its noise floor);
- ``separation`` (circuit rows): damage direction x (circuit plant - random plant of the same k and
  alpha), both computed on every draw; ``separates`` when its CI lies above 0;
- per probe and metric, the detection curve's summary (``min_detectable_k``, and at that k the largest
  alpha detected) and the positive control's verdict: at the strongest damage (smallest alpha) the metric
  must not move the wrong way at any k, must detect the circuit plant at some k, and (a metric measured on
  circuit heads) must separate circuit from random plants at some k. ``failing_metrics`` says which fail
  and why (relative V fails: ablated heads make the remaining heads' shares of the damaged model's own
  gap grow). Per probe also the minimum detectable effects on V, P and forgetting at the config's item
  count (one model against base, 80% power).

Once the table is written the planted weights are deleted (``drop_planted_weights``); the rest of each
folder stays, and a rerun plants a model again where its weights are missing.
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from dcv.circuits.competence import base_competence
from dcv.circuits.methods import RANKING_METHODS, patching_method
from dcv.circuits.noise_floor import bootstrap_floor
from dcv.circuits.pipeline import build_work_items
from dcv.config import ExperimentConfig
from dcv.detection import CALIBRATION_METRICS, PRECISION, measure, metric_rows, noise_margins, verdict
from dcv.matched import MDE_FACTOR, ProbeParts, ProbeReference, probe_numbers
from dcv.results import build_results_table
from dcv.storage import (
    BASE_MODEL,
    CALIBRATION_FILE,
    atomic_path,
    calibration_dir,
    read_json,
    read_parquet,
    write_parquet,
)
from dcv.tables import Head, base_circuits, circuit_heads

PLANT_FILE = "dcv_planted.json"
PLANTED_WEIGHTS = "model.safetensors"
CALIBRATION_SCHEMA = {
    "probe": pl.String,
    "method": pl.String,  # patching method
    "kind": pl.String,  # circuit | random | precision
    "k": pl.Int32,  # heads planted (0 for the precision copy)
    "alpha": pl.Float64,  # their output's scale (1 for the precision copy)
    "heads": pl.String,  # the planted heads, "layer.head"
    "n_items": pl.Int32,
    "lost": pl.Boolean,  # the plant's gap fell below lost_fraction of the base's: relative V, P, J null
    "planted_in_top_k": pl.Int32,  # circuit plants: planted heads among the k circuit heads of largest v_h
    "noise_floor_preservation": pl.Float64,  # 5th percentile of the base circuit against itself
    "below_floor": pl.Boolean,  # the plant's P below it
    "metric": pl.String,  # one of CALIBRATION_METRICS
    "damage": pl.Int8,  # +1: larger is worse; -1: smaller is worse (dcv.metrics)
    "base_value": pl.Float64,  # the base model's own value: no change
    "value": pl.Float64,  # null where not measurable (relative V, P and J of a lost plant)
    "ci_low": pl.Float64,  # item-bootstrap CI (circuits.ci_level, circuits.n_bootstrap draws)
    "ci_high": pl.Float64,
    "detected": pl.Boolean,  # CI beyond base_value in the damage direction (precision: a false positive)
    "flagged": pl.Boolean,  # detected, or (preservation) P below its noise floor: any alarm
    "separation": pl.Float64,  # circuit rows: damage x (circuit - random plant of the same k and alpha)
    "separation_ci_low": pl.Float64,
    "separation_ci_high": pl.Float64,
    "separates": pl.Boolean,  # separation's CI above 0
    "passes_positive_control": pl.Boolean,  # per probe and metric (see the module docstring)
    "failure": pl.String,  # per probe and metric: why it fails (null when it passes)
    # per probe and metric: it fails as an instrument (wrong way, or no circuit-vs-random separation):
    # left out of the answer (``dcv.detection.failing_metrics``)
    "invalid": pl.Boolean,
    "noise_margin": pl.Float64,  # how far item noise alone moves the metric (``noise_margins``)
    "min_detectable_k": pl.Int32,  # per probe and metric: the smallest k of a detected circuit plant
    "min_detectable_alpha": pl.Float64,  # at that k, the largest alpha detected (the weakest damage)
    "mde_vulnerability": pl.Float64,  # per probe: minimum detectable V, P and forgetting (one model)
    "mde_preservation": pl.Float64,
    "mde_forgetting": pl.Float64,
}


def calibration_path(storage_root: Path) -> Path:
    return calibration_dir(storage_root) / CALIBRATION_FILE


def read_calibration(storage_root: Path) -> pl.DataFrame | None:
    """The stored calibration table, or None when calibration never ran."""
    return read_parquet(calibration_path(storage_root), CALIBRATION_SCHEMA)


@dataclass(frozen=True)
class Plant:
    probe: str  # "" for the precision copy (measured on every probe)
    kind: str  # circuit | random | precision
    k: int
    heads: tuple[Head, ...]
    alpha: float = 1.0

    @property
    def name(self) -> str:
        if self.kind == PRECISION:
            return "planted-precision"
        return f"planted-{self.probe}-{self.kind}-k{self.k}-a{self.alpha:g}"


def plan_plants(
    circuits: dict[str, list[Head]],
    shape: tuple[int, int],
    ks: Sequence[int],
    alphas: Sequence[float],
    seed: int,
) -> list[Plant]:
    """The precision copy, then per probe, k and alpha: the top-k circuit heads and k random non-circuit
    heads (the same random heads at every alpha of a k, so the curve grades one set)."""
    every = [(la, h) for la in range(shape[0]) for h in range(shape[1])]
    plants = [Plant("", PRECISION, 0, ())]
    for probe, circuit in circuits.items():
        outside = [h for h in every if h not in set(circuit)]
        rng = random.Random(f"calibration:{seed}:{probe}")
        for k in ks:
            top = tuple(circuit[:k]) if k <= len(circuit) else None
            others = tuple(sorted(rng.sample(outside, k))) if k <= len(outside) else None
            for alpha in alphas:
                if top:
                    plants.append(Plant(probe, "circuit", k, top, alpha))
                if others:
                    plants.append(Plant(probe, "random", k, others, alpha))
    return plants


def plant_damage(model, heads: Sequence[Head], alpha: float):
    """Scale the ``o_proj`` input columns of each head (its output's contribution) by ``alpha``, in place."""
    import torch

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    with torch.no_grad():
        for layer, head in heads:
            weight = model.model.layers[layer].self_attn.o_proj.weight
            weight[:, head * head_dim : (head + 1) * head_dim] *= alpha
    return model


def plant_precision(model, seed: int = 0):
    """The model at numerical precision, in place: float32 weights cast to bfloat16 and back (a relative
    error up to 2^-9 each, what storing them in bf16 does); weights already in 16 bits, where that round
    trip is exact, each moved one unit in the last place up or down at random."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in model.parameters():
            if not weight.is_floating_point():
                continue
            if weight.element_size() >= 4:
                weight.copy_(weight.to(torch.bfloat16).to(weight.dtype))
            else:
                up = (torch.rand(weight.shape, generator=generator) < 0.5).to(weight.device)
                toward = torch.where(up, torch.inf, -torch.inf).to(weight.dtype)
                weight.copy_(torch.nextafter(weight, toward))
    return model


def write_plants(
    cfg: ExperimentConfig,
    plants: Sequence[Plant],
    storage: Path,
    probes: Sequence[str],
    progress: Callable[[str], None],
) -> pl.DataFrame:
    """Each planted model's HF folder and its scores on ``probes`` (per-item LDs, as a fine-tuned
    checkpoint has), written once: a folder whose marker holds the same plan is reused as it is. Returns
    the results-table rows that name them, the base model's first."""
    from dcv.evaluation import evaluate_probe
    from dcv.models import load_model_and_tokenizer, save_model
    from dcv.tasks.probes import build_probes

    base, tokenizer = load_model_and_tokenizer(cfg.model)
    probe_sets = build_probes([cfg.probe(p) for p in probes], tokenizer, cfg.target_task)

    def scores_of(model) -> dict[str, list[float]]:
        return {
            s.probe: list(s.ld)
            for s in (evaluate_probe(model, p, cfg.evaluation.batch_size) for p in probe_sets)
        }

    rows = [("base", 0, cfg.model.name, scores_of(base))]
    for plant in plants:
        folder = calibration_dir(storage) / "models" / plant.name
        spec = {
            "base": cfg.model.name,
            "kind": plant.kind,
            "heads": [list(h) for h in plant.heads],
            "alpha": plant.alpha,
            "probes": [cfg.probe(p).model_dump(mode="json") for p in probes],
        }
        marker = folder / PLANT_FILE
        done = read_json(marker, ("spec", "item_ld")) or {}  # unreadable: moved aside, planted again
        # Weights missing: dropped after an earlier calibration finished (drop_planted_weights).
        if done.get("spec") != spec or not (folder / PLANTED_WEIGHTS).is_file():
            model = copy.deepcopy(base)
            if plant.kind == PRECISION:
                model = plant_precision(model, cfg.calibration.seed)
            model = plant_damage(model, plant.heads, plant.alpha).eval()
            save_model(model, tokenizer, folder)
            done = {"spec": spec, "item_ld": scores_of(model)}
            with atomic_path(marker) as tmp:
                tmp.write_text(json.dumps(done))
            progress(f"calibration: wrote {plant.name} ({len(plant.heads)} heads at alpha {plant.alpha:g})")
        rows.append((plant.name, 1, str(folder), done["item_ld"]))
    table = build_results_table(
        [
            {
                "trial": name,
                "method": "planted" if step else "base",
                "learning_rate": 0.0,
                "seed": 0,
                "init": "base",
                "step": step,
                "checkpoint": checkpoint,
                "metrics": {f"probe/{p}/{m}": v for p, ld in lds.items() for m, v in _scores(ld).items()},
            }
            for name, step, checkpoint, lds in rows
        ]
    )
    by_trial = {name: lds for name, _, _, lds in rows}
    return table.with_columns(
        pl.Series(f"probe/{p}/item_ld", [by_trial[t][p] for t in table["trial"]], dtype=pl.List(pl.Float64))
        for p in probes
    )


def _scores(ld: list[float]) -> dict[str, float]:
    """A probe's accuracy (LD > 0) and mean LD from its per-item LDs (as ``evaluate_probe`` gives them)."""
    from statistics import fmean

    return {"accuracy": fmean(v > 0 for v in ld), "mean_ld": fmean(ld)}


def _parts(effects: pl.DataFrame, model: str, probe: str, method: str, item_ld) -> ProbeParts:
    rows = effects.filter(
        (pl.col("model") == model) & (pl.col("probe") == probe) & (pl.col("method") == method)
    )
    rows = rows.sort("layer", "head")
    delta = np.array(rows["item_delta"].to_list(), dtype=np.float64)
    ld = None if item_ld is None else np.asarray(item_ld, dtype=np.float64)
    return ProbeParts(delta, np.asarray(rows["item_denominator"][0], dtype=np.float64), ld)


def _index(shape: tuple[int, int], heads: Sequence[Head]) -> np.ndarray:
    return np.array([layer * shape[1] + head for layer, head in heads], dtype=np.int64)


def _draws_and_floor(
    cfg: ExperimentConfig, base: ProbeParts, circuit: np.ndarray, seed: int
) -> tuple[list[np.ndarray], float, dict[str, float], dict[str, float]]:
    """A probe's item draws (shared by every model measured on it, so their values pair up), P's noise
    floor (5th percentile of the base circuit against itself), the minimum detectable effects and each
    metric's noise margin (``dcv.detection.noise_margins``)."""
    floor = bootstrap_floor(base.delta, base.denominator, circuit, cfg.circuits.noise_floor_resamples, seed)
    rng = np.random.default_rng(seed)
    n = base.denominator.shape[0]
    draws = [rng.integers(0, n, n) for _ in range(cfg.circuits.n_bootstrap)]
    ld = base.item_ld
    base_accuracy = [float((ld[d] > 0).mean()) for d in draws] if ld is not None else [0.0]
    mde = {
        "mde_vulnerability": MDE_FACTOR * float(np.std(floor["circuit_vulnerability"], ddof=1)),
        "mde_preservation": MDE_FACTOR * float(np.std(floor["preservation"], ddof=1)),
        # Never below one item in n: a base model right on every item has no spread to scale.
        "mde_forgetting": max(MDE_FACTOR * float(np.std(base_accuracy, ddof=1)), 1.0 / n),
    }
    margins = noise_margins(floor, ld, draws)
    return draws, float(np.quantile(floor["preservation"], 0.05)), mde, margins


def calibration_table(
    cfg: ExperimentConfig,
    plants: Sequence[Plant],
    results: pl.DataFrame,
    effects: pl.DataFrame,
    circuits: pl.DataFrame,
    shape: tuple[int, int],
    seed: int = 0,
) -> pl.DataFrame:
    """CALIBRATION_SCHEMA rows: every plant and metric measured against the base (the precision copy once
    per probe), with each probe's detection curves and positive-control verdicts."""
    method = cfg.patching.methods[0]
    item_ld = {r["trial"]: r for r in results.iter_rows(named=True)}
    reference = base_circuits(circuits)
    own = {
        (r["model"], r["probe"]): r for r in circuits.filter(pl.col("method") == method).iter_rows(named=True)
    }
    probes = sorted({p.probe for p in plants if p.kind != PRECISION})
    precision = [p for p in plants if p.kind == PRECISION]
    rows = []
    for probe in probes:
        probe_cfg = cfg.probe(probe)
        base = _parts(effects, BASE_MODEL, probe, method, item_ld[BASE_MODEL][f"probe/{probe}/item_ld"])
        circuit = _index(shape, reference[(probe, method)])
        ref = ProbeReference(probe, base, circuit, probe_cfg.lost_fraction, True, True)
        n = base.denominator.shape[0]
        draws, floor_p, mde, margins = _draws_and_floor(cfg, base, circuit, seed)
        base_value = probe_numbers(base, ref, circuit, None)[0]
        ours = [p for p in plants if p.probe == probe] + precision
        measured = {}
        for plant in ours:
            model = f"{plant.name}@1"
            parts = _parts(effects, model, probe, method, item_ld[plant.name][f"probe/{probe}/item_ld"])
            measured[plant] = measure(parts, ref, _index(shape, circuit_heads(own[(model, probe)])), draws)
        twins = {(p.k, p.alpha): measured[p] for p in ours if p.kind == "random"}
        probe_rows = []
        for plant in ours:
            m = measured[plant]
            ranked = [int(circuit[i]) for i in np.argsort(-m.v_abs, kind="stable")]
            planted = set(_index(shape, plant.heads).tolist())
            below = bool(m.point["preservation"] < floor_p) if np.isfinite(m.point["preservation"]) else True
            twin = twins.get((plant.k, plant.alpha)) if plant.kind == "circuit" else None
            top_k = len(planted & set(ranked[: plant.k])) if plant.kind == "circuit" else None
            common = {
                "probe": probe,
                "method": method,
                "kind": plant.kind,
                "k": plant.k,
                "alpha": plant.alpha,
                "heads": " ".join(f"{la}.{h}" for la, h in plant.heads),
                "n_items": n,
                "lost": bool(m.point["lost"]),
                "planted_in_top_k": top_k,
                "noise_floor_preservation": floor_p,
                "below_floor": below,
                **mde,
            }
            for row in metric_rows(m, base_value, twin, cfg.circuits.ci_level, margins):
                flagged = row["detected"] or (row["metric"] == "preservation" and below)
                probe_rows.append(common | row | {"flagged": flagged})
        for metric in CALIBRATION_METRICS:
            of_metric = [r for r in probe_rows if r["metric"] == metric]
            judged = verdict(metric, of_metric)
            for row in of_metric:
                row.update(judged)
        rows += probe_rows
    return pl.DataFrame(rows, schema=CALIBRATION_SCHEMA)


def drop_planted_weights(storage: Path, plants: Sequence[Plant]) -> None:
    """Delete the planted models' weights once the table is written (0.54 GB each for SmolLM2; 17 plants
    took 9.2 GB). Their effects, circuits and per-item LDs stay; a rerun that needs a model again plants
    it again (``write_plants``: a deepcopy of the base and a few scaled columns, seconds)."""
    for plant in plants:
        (calibration_dir(storage) / "models" / plant.name / PLANTED_WEIGHTS).unlink(missing_ok=True)


def run_calibration(
    cfg: ExperimentConfig,
    storage: Path,
    probes: Sequence[str] | None = None,
    progress: Callable[[str], None] = print,
) -> pl.DataFrame:
    """Plant, patch, find circuits and measure; needs a connected Ray and the base snapshot in ``cfg``.
    Every step resumes: planted folders, patching items and circuit files are reused when unchanged."""
    from dcv.circuits.model_circuits import run_circuits
    from dcv.circuits.pipeline import run_pipeline
    from dcv.models import model_head_grid

    c = cfg.calibration
    method = cfg.patching.methods[0]
    if not patching_method(method).ranks_heads:
        # The plants are the top-k of a ranked circuit, measured on per-item parts: a ranking method's.
        raise ValueError(
            f"calibration: patching.methods[0] is {method}, which ranks no heads; calibrate a method that "
            f"does first ({', '.join(RANKING_METHODS)})"
        )
    folder = calibration_dir(storage)
    start = time.perf_counter()
    empty = build_results_table(
        [
            {
                "trial": BASE_MODEL,
                "method": "base",
                "learning_rate": 0.0,
                "seed": 0,
                "init": "base",
                "step": 0,
                "checkpoint": cfg.model.name,
                "metrics": {},
            }
        ]
    )
    base_work = build_work_items(cfg, empty)
    base_effects = run_pipeline(
        cfg, progress=progress, work=base_work, out=folder / "base_effects.parquet"
    ).table
    base_circ = run_circuits(cfg, base_effects, storage, progress, out_dir=folder / "base", curves=False)
    reference = base_circuits(base_circ)
    shape = model_head_grid(cfg.model)
    chosen = []
    for probe in probes or c.probes or [p.name for p in cfg.probes if p.name != "chem"]:
        rows = base_effects.filter((pl.col("probe") == probe) & (pl.col("method") == method))
        guard = base_competence(
            np.asarray(rows["item_denominator"][0]), 1.0, 0.0, cfg.circuits.n_bootstrap, cfg.circuits.ci_level
        )
        if not guard.competent or not reference[(probe, method)]:
            progress(f"calibration: skipping {probe}: {guard.reason or 'empty base circuit'}")
            continue
        chosen.append(probe)
    if not chosen:
        # Nothing the instrument could be calibrated on: said in the report, not a failed run.
        progress("calibration: no probe the base model does has a base circuit; nothing to plant")
        table = pl.DataFrame(schema=CALIBRATION_SCHEMA)
        write_parquet(table, calibration_path(storage))
        return table
    plants = plan_plants({p: reference[(p, method)] for p in chosen}, shape, c.k, c.alphas, c.seed)
    results = write_plants(cfg, plants, storage, chosen, progress)
    # The base model's items as the experiment has them (every probe and method: its circuit file is
    # shared with the circuits stage), each planted model on its own probe with the primary method.
    keep = [(p.name + "@1", p.probe) for p in plants if p.kind != PRECISION]
    keep += [(p.name + "@1", probe) for p in plants if p.kind == PRECISION for probe in chosen]
    keep_frame = pl.DataFrame(keep, schema={"model": pl.String, "probe": pl.String}, orient="row")
    planted = build_work_items(cfg, results, chosen).join(keep_frame, on=["model", "probe"])
    work = pl.concat([base_work, planted.filter(pl.col("method") == method)])
    effects = run_pipeline(cfg, progress=progress, work=work, out=folder / "effects.parquet").table
    circuits = run_circuits(cfg, effects, storage, progress, out_dir=folder, curves=False)
    table = calibration_table(cfg, plants, results, effects, circuits, shape, c.seed)
    write_parquet(table, calibration_path(storage))
    with atomic_path(folder / "calibration.csv") as tmp:
        table.write_csv(tmp)
    drop_planted_weights(storage, plants)
    seconds = time.perf_counter() - start
    progress(f"calibration: {len(plants)} planted models on {', '.join(chosen)} in {seconds:.0f} s")
    return table
