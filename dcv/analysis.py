"""The analysis: from the results, patching and circuits tables to the numbers the report shows.

Pure polars/numpy on stored tables (no model, no Ray), so ``dcv report`` can rebuild it all. Tables
(``analyze`` returns them by name; ``write_analysis`` stores each as parquet and CSV under
``<storage>/analysis/``):

- ``base_circuits``: per probe and patching method, the base circuit (size out of all heads,
  faithfulness, whether it reached tau, its heads).
- ``checkpoints``: per (trial, step, probe, patching method): target accuracy, KL to base, the probe's
  accuracy and mean LD, forgetting = base score - checkpoint score (``forgetting`` on accuracy,
  ``forgetting_ld`` on mean LD), the checkpoint's own circuit size, preservation P = |C_base ∩ C_M| /
  |C_base|, the Spearman of all heads' effects with the base, F(C_base, M) and circuit vulnerability V(M).
  A trial's step 0 from the base is the base model (everything 0 or 1 there). Beside P and J their chance
  levels (``preservation_chance``, ``jaccard_chance``: a random head set of the checkpoint's circuit size,
  ``dcv.circuits.chance``) and ``*_above_chance`` = value - chance. A lost checkpoint (``status`` "lost")
  has no number divided by its own gap: own-circuit F, F(C_base, M), the effect Spearman, P, J, relative
  V and the chance levels are null (docs/method.md "Competence guard and the lost rule"); learned masks,
  whose parts hold a pseudo-gap of 1, take the lost rule from another method's gap or the clean LD
  (``_mask_gaps``).
- ``summary``: per (trial, step, patching method), the means over probes (chance levels included).
- ``dcv_heads``: per probe, patching method and matching point (``by`` = step | accuracy), DCV_h =
  v_h(SFT) - v_h(RL) of every base-circuit head, with bootstrap CIs over seeds and probe items.
- ``correlations``: Spearman of V(M) with forgetting across fine-tuned checkpoints, per probe (and the
  mean over probes), per method and pooled.
- ``headline``: SFT vs RL at every matched level of target accuracy, KL and step: each metric's mean over runs
  per method and the SFT - RL difference at two levels of claim (docs/method.md "Statistics: what a comparison
  may claim"): these runs (item-bootstrap CI, runs held fixed) and across seeds (``dcv.matched.across_seeds``:
  Welch's t with the item variance folded in, its MDE and the runs per method an effect would need); ``role``
  marks the primary endpoint (``analysis.primary``) and the Holm-adjusted secondary family (``assign_roles``).
- ``noise_floor``: the base circuit against itself on bootstrap resamples of the probe items (masks: refits
  on resamples and with the next seed), ``dcv.circuits.noise_floor``; its floors of preservation and
  Jaccard (5th percentiles) stand beside every checkpoint's preservation (``noise_floor_*`` columns,
  ``within_noise_floor``).
- ``after_sft``: each GRPO-after-SFT checkpoint beside the SFT checkpoint it started from (its step 0).
- ``benchmarks``: every checkpoint's lm-eval scores; ``forgetting_bench`` in ``checkpoints`` and
  ``summary`` is the mean over benchmarks of base accuracy - checkpoint accuracy.
- ``paper``: per discovery method, circuit size, base-circuit retention (%) and faithfulness of the base
  model and of each method's final checkpoints, beside the seed paper's figures; on the retention row
  ``chance_*`` (ours) and ``paper_chance_*`` (the paper's sizes of 576 heads): a random set's retention.
- ``predictors``: what predicts forgetting (``dcv.predictors``): R^2 and Spearman of each candidate
  (KL to base, mean weight change, V, 1 - P, 1 - J, CMAP, steps; ``analysis.predictors``) against
  forgetting over all fine-tuned checkpoints, within each method first, then pooled with a method fixed
  effect and plain pooled, leave-one-run-out R^2, circuit predictors on probe items disjoint from the
  forgetting's (``analysis.predictor_item_split``), CIs from the same bootstrap draws, n beside them.
- ``weight_vs_function``: per checkpoint and probe, Spearman of the base-circuit heads' weight change
  (``dcv.circuits.weight_change``) with their v_h, and per method over all its checkpoints.
- ``weight_change_heads``: the weight-change stage's per-head numbers, means over runs per method and
  step (the report's heatmap). ``weight_change`` in ``checkpoints`` and ``summary`` is the checkpoint's
  mean over heads (null without the stage), ``cmap`` its CMAP predictor (``mean_cmap``; null without
  cmap).
- ``faithfulness_areas``, ``faithfulness_curve_means``, ``faithfulness_area_means``: the base ranking's
  faithfulness curve F(C_k(base), M) in every checkpoint, its areas CPR and CMD (MIB's), and their plain
  means over runs per step (``dcv.circuits.curves.curve_tables``; empty with ``circuits.curve_fractions``
  [] or a circuits table stored before the curves).
- ``cmap``: with ``cmap`` in ``patching.methods``, per circuit method, checkpoint, probe and direction, the
  mean |cmap_h| over the probe's base-circuit heads (item-bootstrap CI) and over every head
  (``cmap_table``); cmap is a change measure, never a circuit method here.

``dcv_heads`` also carries ``effect_gap`` = DCV_h |e_h(base)| = e_h(RL) - e_h(SFT) (for masks the seed
paper's m_h(RL) - m_h(SFT)) and ``sft_weakened`` = effect_gap > ``circuits.mask.weakened_delta``.

Runs of one method at several learning rates are pooled as replicates of that method: the comparison
is meant to be at matched target accuracy, where the learning rate matters through where a run gets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from dcv.circuits.chance import chance_jaccard, chance_preservation
from dcv.circuits.competence import Competence, base_competence
from dcv.circuits.curves import curve_tables
from dcv.circuits.methods import ITEM_PARTS_METHODS, circuit_methods, patching_method
from dcv.circuits.noise_floor import NOISE_FLOOR_SCHEMA, bootstrap_floor, floor_row
from dcv.circuits.vulnerability import effect_spearman
from dcv.config import ExperimentConfig
from dcv.matched import (
    TRAINING_METHODS,
    Layout,
    Point,
    ProbeParts,
    ProbeReference,
    Run,
    across_seeds,
    checkpoint_numbers,
    compare,
    grid,
    holm,
    interval,
    probe_numbers,
    resample,
)
from dcv.metrics import ANSWER_METRICS, FIXED_METRICS, HEADLINE_METRICS, METRICS, NULLABLE_METRICS
from dcv.predictors import (
    PREDICTORS_SCHEMA,
    WEIGHT_FUNCTION_SCHEMA,
    predictor_table,
    spearman,
    weight_function_table,
)
from dcv.storage import BASE_MODEL, analysis_dir, atomic_path, checkpoint_model, read_parquet, write_parquet
from dcv.tables import Head, circuit_heads, faithfulness_curves

TABLES = (
    "base_circuits",
    "checkpoints",
    "summary",
    "dcv_heads",
    "correlations",
    "headline",
    "noise_floor",
    "after_sft",
    "paper",
    "benchmarks",
    "predictors",
    "weight_vs_function",
    "weight_change_heads",
    "cmap",
    "faithfulness_areas",
    "faithfulness_curve_means",
    "faithfulness_area_means",
)
NOISE_FLOOR_COLUMNS = ("noise_floor_preservation", "noise_floor_jaccard", "noise_floor_vulnerability")
MATCHED_ON = {"accuracy": "target_accuracy", "kl": "kl_to_base"}  # the number each axis matches on
TARGET_PROBE = "chem"  # the target task's own probe: reported on its own, never in prior-capability means
TARGET_ITEMS = "target/item_correct"  # results-table column: per test item, 1 if answered correctly
# Float columns of the checkpoints table that can be null: the metrics' (``dcv.metrics``), the noise floor's,
# and the own circuit's F and the effect Spearman (null where the checkpoint lost the probe).
NULLABLE = (*NOISE_FLOOR_COLUMNS, *NULLABLE_METRICS, "faithfulness", "effect_spearman")
# What names a checkpoint in the checkpoints and summary tables.
CHECKPOINT_KEYS = ("trial", "training", "init", "learning_rate", "seed", "step", "model")
# The checkpoints and summary tables' column order; a metric of ``dcv.metrics`` not named here follows.
CHECKPOINT_COLUMNS = (
    *CHECKPOINT_KEYS,
    "target_accuracy",
    "kl_to_base",
    "probe",
    "patching",
    "status",
    "in_means",
    "in_forgetting",
    "probe_accuracy",
    "probe_mean_ld",
    "forgetting",
    "forgetting_ld",
    "forgetting_bench",
    "weight_change",
    "cmap",
    "gap",
    "base_gap",  # masks: the real gap their lost rule reads (``_mask_gaps``), as ``gap`` is
    "lost",
    "circuit_size",
    "faithfulness",
    "preservation",
    "jaccard",
    "preservation_chance",  # E[P] and E[J] of a random head set of the checkpoint's circuit size
    "jaccard_chance",
    "effect_spearman",
    "base_circuit_faithfulness",
    "circuit_vulnerability",
    "circuit_vulnerability_abs",
    *NOISE_FLOOR_COLUMNS,
    "within_noise_floor",
    "preservation_above_chance",
    "jaccard_above_chance",
)
SUMMARY_KEYS = (*CHECKPOINT_KEYS, "patching")
SUMMARY_COLUMNS = (
    *SUMMARY_KEYS,
    "target_accuracy",
    "kl_to_base",
    "forgetting_bench",
    "weight_change",
    "cmap",
    "forgetting",
    "forgetting_ld",
    "n_lost",
    "n_probes_forgetting",
    "preservation",
    "jaccard",
    "preservation_chance",
    "jaccard_chance",
    "base_circuit_faithfulness",
    "circuit_vulnerability",
    "circuit_vulnerability_abs",
    "circuit_size",
    "faithfulness",
    *NOISE_FLOOR_COLUMNS,
    "n_probes_circuits",
    "preservation_above_chance",
    "jaccard_above_chance",
)
# The seed paper's figures (Qwen2.5-3B-Instruct, 576 heads, learned masks), set beside ours (docs/method.md
# "The seed paper's protocol and numbers").
PAPER = {
    "circuit_size": {"base": 297.0, "sft": 265.0, "rl": 296.0},
    "retention_pct": {"base": 100.0, "sft": 52.0, "rl": 68.0},
    "faithfulness": {"base": 1.02, "sft": 1.04, "rl": 1.12},
}
PAPER_HEADS = 576


def _with_model(results: pl.DataFrame) -> pl.DataFrame:
    models = [checkpoint_model(t, s, i) for t, s, i in results.select("trial", "step", "init").iter_rows()]
    return results.with_columns(pl.Series("model", models, dtype=pl.String))


def base_circuit_table(circuits: pl.DataFrame, shape: tuple[int, int], inputs: Sequence) -> pl.DataFrame:
    """The base circuits with the competence guard; ``shape`` is the model's (layers, heads per layer)."""
    guard = [
        {
            "probe": ref.name,
            "method": data.method,
            "base_accuracy": data.competence[ref.name].accuracy,
            "base_gap": data.competence[ref.name].gap,
            "gap_ci_low": data.competence[ref.name].gap_ci_low,
            "gap_ci_high": data.competence[ref.name].gap_ci_high,
            "n_items": data.competence[ref.name].n_items,
            "competent": data.competence[ref.name].competent,
            "in_means": ref.in_means,
            "excluded_because": _excluded_because(ref, data.competence[ref.name], data.circuits[ref.name]),
        }
        for data in inputs
        for ref in data.refs
    ]
    base = circuits.filter(pl.col("model") == BASE_MODEL).join(
        pl.DataFrame(guard), on=["probe", "method"], how="left"
    )
    return base.select(
        "probe",
        "method",
        "size",
        pl.lit(shape[0] * shape[1], pl.Int32).alias("n_heads_total"),
        pl.lit(shape[0], pl.Int32).alias("n_layers"),
        pl.lit(shape[1], pl.Int32).alias("heads_per_layer"),
        "faithfulness",
        "reached_tau",
        pl.struct("layers", "heads")
        .map_elements(
            lambda r: " ".join(f"{la}.{h}" for la, h in zip(r["layers"], r["heads"], strict=True)),
            return_dtype=pl.String,
        )
        .alias("circuit"),
        "base_accuracy",
        "base_gap",
        "gap_ci_low",
        "gap_ci_high",
        "n_items",
        "competent",
        "in_means",
        "excluded_because",
    ).sort("probe", "method")


def _excluded_because(ref, competence: Competence, circuit: dict) -> str:
    """Why a probe is left out of the means over prior capabilities ("" when it is in them)."""
    if not competence.competent:
        return f"the base model cannot do it: {competence.reason}"
    if not ref.circuit.size:
        return "empty base circuit"
    if ref.name == TARGET_PROBE:
        return "the target task's own probe (reported on its own)"
    if not circuit["reached_tau"]:
        return f"its circuit did not reach tau (faithfulness {circuit['faithfulness']:.3g})"
    return ""


@dataclass(frozen=True)
class Inputs:
    """Everything the matched comparison and the per-checkpoint tables of one patching method read."""

    method: str
    refs: list[ProbeReference]
    layout: Layout
    # (model id, step) -> point; the base model is (BASE, 0). An SFT checkpoint that starts RL runs is a
    # point of its SFT run at its own step and of each RL run at step 0 (never matched: ``run_list``).
    points: dict[tuple[str, int], Point]
    rows: list[dict]  # the results table's rows with their model id
    competence: dict[str, Competence]
    circuits: dict[str, dict]  # probe -> the base circuit's CIRCUITS_SCHEMA row
    n_layers: int


def _item_list(row: dict, column: str) -> np.ndarray | None:
    values = row.get(column)
    return None if values is None else np.asarray(values, dtype=np.float64)


def _probe_parts(frame: pl.DataFrame, item_ld: np.ndarray | None, gap: float | None = None) -> ProbeParts:
    frame = frame.sort("layer", "head")
    delta = np.array(frame["item_delta"].to_list(), dtype=np.float64)
    return ProbeParts(delta, np.asarray(frame["item_denominator"][0], dtype=np.float64), item_ld, gap)


def _mask_gaps(
    effects: pl.DataFrame, results: pl.DataFrame, probes: Sequence[str], method: str
) -> dict[tuple[str, str], float]:
    """Learned masks' (``method``'s) real gap per (model, probe), for the lost rule (docs/method.md
    "Competence guard and the lost rule"): their parts hold a pseudo-item of 1 in every model, so a model
    that forgot a probe was never lost. Another patching method's mean LD_clean - LD_corrupt on the same
    model and probe where every model has one, else the model's mean clean LD (``probe/<p>/mean_ld``);
    there, masks that are all 0 (``learn_masks``' answer to a gap <= 0) count as a gap of at most 0."""
    models = _with_model(results).unique("model", maintain_order=True)
    zero = {
        (m, p): z
        for m, p, z in effects.filter(pl.col("method") == method)
        .group_by("model", "probe")
        .agg((pl.col("effect") == 0).all())
        .iter_rows()
    }
    others = (
        effects.filter(pl.col("method").is_in(ITEM_PARTS_METHODS))
        .group_by("probe", "method", "model")
        .agg(pl.col("item_denominator").first())
        .sort("probe", "method")
    )
    gaps = {}
    for probe in probes:
        by_method: dict[str, dict[str, float]] = {}
        for _, method, model, denominator in others.filter(pl.col("probe") == probe).iter_rows():
            by_method.setdefault(method, {})[model] = float(np.mean(denominator))
        complete = [g for g in by_method.values() if all(m in g for m in models["model"])]
        for model, mean_ld in models.select("model", f"probe/{probe}/mean_ld").iter_rows():
            if complete:
                gaps[(model, probe)] = complete[0][model]
            else:
                gap = float(mean_ld)
                gaps[(model, probe)] = min(gap, 0.0) if zero.get((model, probe)) else gap
    return gaps


def _chance(ref: ProbeReference, model_size: int) -> tuple[float | None, float | None]:
    """(E[P], E[J]) of a random set of ``model_size`` heads, out of every head the method scored, against
    the probe's base circuit (``dcv.circuits.chance``); None for an empty base circuit."""
    n_heads, base_size = ref.base.delta.shape[0], len(ref.circuit)
    return chance_preservation(n_heads, base_size, model_size), chance_jaccard(n_heads, base_size, model_size)


def _indices(frame: pl.DataFrame, heads: Sequence[Head]) -> np.ndarray:
    """Rows of ``heads`` in the frame's (layer, head) order, as in ``ProbeParts.delta``."""
    ordered = frame.sort("layer", "head")
    index = {(la, h): i for i, (la, h) in enumerate(zip(ordered["layer"], ordered["head"], strict=True))}
    return np.array([index[h] for h in heads], dtype=np.int64)


def _competence(cfg: ExperimentConfig, effects: pl.DataFrame, base_row: dict) -> dict[str, Competence]:
    """Per probe, from the base model's per-item gaps of a patching method (masks have none: one
    pseudo-item, so with masks alone only the accuracy is checked)."""
    out = {}
    base = effects.filter(pl.col("model") == BASE_MODEL)
    for probe in cfg.probes:
        rows = base.filter(pl.col("probe") == probe.name)
        gaps = rows.filter(pl.col("method").is_in(ITEM_PARTS_METHODS))
        source = gaps if not gaps.is_empty() else rows
        out[probe.name] = base_competence(
            np.asarray(source["item_denominator"][0], dtype=np.float64),
            float(base_row[f"probe/{probe.name}/accuracy"]),
            probe.min_accuracy,
            cfg.circuits.n_bootstrap,
            cfg.circuits.ci_level,
        )
    return out


def build_inputs(
    cfg: ExperimentConfig,
    results: pl.DataFrame,
    effects: pl.DataFrame,
    circuits: pl.DataFrame,
    method: str,
    weight_change: dict[str, float] | None = None,
    cmap: pl.DataFrame | None = None,
) -> Inputs:
    """Probe references and every model's point for one patching method, from the stored tables;
    ``weight_change``: each checkpoint's mean head weight change (None: not measured, NaN); ``cmap``: the
    CMAP table (``dcv.tables.CMAP_SCHEMA``; None: not measured, NaN)."""
    probes = [p.name for p in cfg.probes]
    base_row = _base_row(results)
    competence = _competence(cfg, effects, base_row)
    # Masks' parts divide by a pseudo-item of 1: the lost rule reads their real gap instead.
    gaps = {} if patching_method(method).item_parts else _mask_gaps(effects, results, probes, method)
    own = {
        (r["model"], r["probe"]): r for r in circuits.filter(pl.col("method") == method).iter_rows(named=True)
    }
    by_model = {
        key: frame for key, frame in effects.filter(pl.col("method") == method).group_by("model", "probe")
    }
    refs = []
    for probe in cfg.probes:
        key = (BASE_MODEL, probe.name)
        if key not in by_model or key not in own:
            raise ValueError(f"no base-model effects or circuit for probe {probe.name} ({method}); rerun")
        frame = by_model[key]
        heads = circuit_heads(own[key])
        usable = competence[probe.name].competent and bool(heads)
        refs.append(
            ProbeReference(
                probe.name,
                _probe_parts(frame, _item_list(base_row, f"probe/{probe.name}/item_ld"), gaps.get(key)),
                _indices(frame, heads) if usable else np.zeros(0, np.int64),
                probe.lost_fraction,
                in_means=usable and bool(own[key]["reached_tau"]) and probe.name != TARGET_PROBE,
                in_forgetting=competence[probe.name].competent and probe.name != TARGET_PROBE,
                base_score=(
                    base_row[f"probe/{probe.name}/accuracy"],
                    base_row[f"probe/{probe.name}/mean_ld"],
                ),
            )
        )
    bench = bench_columns(results)
    base_bench = results.filter((pl.col("step") == 0) & (pl.col("init") == "base")).head(1)
    in_means = [r.name for r in refs if r.in_means]
    in_means_circuits = {p: circuit_heads(own[(BASE_MODEL, p)]) for p in in_means}
    points, rows = {}, []
    for row in _with_model(results).iter_rows(named=True):
        model, key = row["model"], (row["model"], row["step"])
        rows.append(row)
        if key in points:
            continue
        missing = [p for p in probes if (model, p) not in own or (model, p) not in by_model]
        if missing:
            raise ValueError(f"no effects or circuit for model {model} probe {missing[0]} ({method}); rerun")
        parts = {
            p: _probe_parts(by_model[(model, p)], _item_list(row, f"probe/{p}/item_ld"), gaps.get((model, p)))
            for p in probes
        }
        circuit = {p: _indices(by_model[(model, p)], circuit_heads(own[(model, p)])) for p in probes}
        # F(C_base, M) and the chance levels of P and J: means over the probes in means that M did not lose
        # (F divides by M's own gap; P and J are not numbers there).
        kept = [
            r
            for r in refs
            if r.in_means and not probe_numbers(parts[r.name], r, circuit[r.name], None)[0]["lost"]
        ]
        faithful = [own[(model, r.name)]["base_circuit_faithfulness"] for r in kept]
        chance = np.array([_chance(r, len(circuit[r.name])) for r in kept], dtype=np.float64).reshape(-1, 2)
        nan = float("nan")
        points[key] = Point(
            step=row["step"],
            kl=row.get("kl_to_base") or 0.0,
            accuracy=row["target/accuracy"],
            correct=_item_list(row, TARGET_ITEMS),
            probes=parts,
            circuit=circuit,
            probe_scores={p: (row[f"probe/{p}/accuracy"], row[f"probe/{p}/mean_ld"]) for p in probes},
            fixed={  # every FIXED_METRICS entry (``_check_fixed``)
                "forgetting_bench": _bench_forgetting(base_bench, row, bench),
                "base_circuit_faithfulness": float(np.mean(faithful)) if faithful else nan,
                "weight_change": _mean_change(weight_change, model),
                "cmap": mean_cmap(cmap, model, in_means_circuits),
                "preservation_chance": float(chance[:, 0].mean()) if kept else nan,
                "jaccard_chance": float(chance[:, 1].mean()) if kept else nan,
            },
        )
    _check_fixed(points.values())
    circuit_rows = {p: own[(BASE_MODEL, p)] for p in probes}
    n_layers = int(effects.filter(pl.col("model") == BASE_MODEL)["layer"].max()) + 1
    layout = Layout.build(refs, FIXED_METRICS)
    return Inputs(method, refs, layout, points, rows, competence, circuit_rows, n_layers)


def _check_fixed(points) -> None:
    """Every point has exactly the registry's fixed metrics (a new one is computed in ``build_inputs``)."""
    for point in points:
        if set(point.fixed) != set(FIXED_METRICS):
            raise ValueError(
                f"Point.fixed has {sorted(point.fixed)}, dcv.metrics.FIXED_METRICS {sorted(FIXED_METRICS)}: "
                "compute every fixed metric in dcv.analysis.build_inputs"
            )


def _or_none(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def _mean_change(weight_change: dict[str, float] | None, model: str) -> float:
    if weight_change is None:
        return float("nan")
    return 0.0 if model == BASE_MODEL else weight_change.get(model, float("nan"))


def head_changes(weight_change: pl.DataFrame | None) -> dict[str, np.ndarray]:
    """Per model of the weight-change stage's table, every head's ``change`` in (layer, head) order."""
    if weight_change is None or weight_change.is_empty():
        return {}
    ordered = weight_change.sort("model", "layer", "head")
    return {m: frame["change"].to_numpy() for (m,), frame in ordered.group_by("model", maintain_order=True)}


WEIGHT_CHANGE_HEADS_SCHEMA = {
    "training": pl.String,
    "step": pl.Int64,
    "layer": pl.Int32,
    "head": pl.Int32,
    "kv_shared_by": pl.Int32,
    "q_change": pl.Float64,
    "k_change": pl.Float64,
    "v_change": pl.Float64,
    "o_change": pl.Float64,
    "change": pl.Float64,
    "changed_share": pl.Float64,
    "n_runs": pl.Int64,
}


def weight_change_heads(weight_change: pl.DataFrame | None) -> pl.DataFrame:
    """Per training method, step and head: the means over runs of the weight-change stage's numbers."""
    if weight_change is None or weight_change.is_empty():
        return pl.DataFrame(schema=WEIGHT_CHANGE_HEADS_SCHEMA)
    numbers = ("q_change", "k_change", "v_change", "o_change", "change", "changed_share")
    return (
        weight_change.rename({"method": "training"})
        .group_by("training", "step", "layer", "head")
        .agg(
            pl.col("kv_shared_by").first(),
            *[pl.col(c).mean() for c in numbers],
            pl.col("trial").n_unique().cast(pl.Int64).alias("n_runs"),
        )
        .select(list(WEIGHT_CHANGE_HEADS_SCHEMA))
        .sort("training", "step", "layer", "head")
    )


def _base_row(results: pl.DataFrame) -> dict:
    base = results.filter((pl.col("step") == 0) & (pl.col("init") == "base"))
    if base.is_empty():
        raise ValueError("the results table has no step-0 row of a trial started from the base model")
    return base.row(0, named=True)


def probe_status(ref: ProbeReference, competence: Competence, circuit: dict, lost: bool) -> str:
    """What a checkpoint's row for a probe holds: ok, lost, or why the probe is not in the means."""
    if not competence.competent:
        return "not competent"
    if not ref.circuit.size:
        return "empty circuit"
    if lost:
        return "lost"
    if ref.name == TARGET_PROBE:
        return "target probe"
    return "ok" if circuit["reached_tau"] else "below tau"


def checkpoint_table(
    cfg: ExperimentConfig, inputs: Sequence[Inputs], circuits: pl.DataFrame, noise_floor: pl.DataFrame
) -> pl.DataFrame:
    """One row per (trial, step, probe, patching method): the probe's numbers over all items."""
    floor = {
        (r["probe"], r["method"]): r
        for r in noise_floor.filter(pl.col("kind") == "bootstrap").iter_rows(named=True)
    }
    own = {(r["model"], r["probe"], r["method"]): r for r in circuits.iter_rows(named=True)}
    base_effects = {}
    rows = []
    for data in inputs:
        numbers = {k: checkpoint_numbers(p, data.refs, data.layout) for k, p in data.points.items()}
        base = data.points[(BASE_MODEL, 0)]
        for row in data.rows:
            model, point = row["model"], data.points[(row["model"], row["step"])]
            vector = numbers[(model, row["step"])]
            for ref in data.refs:
                key = (model, ref.name, data.method)
                if (ref.name, data.method) not in base_effects:
                    base_effects[(ref.name, data.method)] = _effects_frame(base, ref)

                def get(metric: str, ref=ref, vector=vector, layout=data.layout) -> float:
                    return float(layout.scalar(vector, f"{ref.name}/{metric}"))

                lost = bool(get("lost"))
                status = probe_status(ref, data.competence[ref.name], data.circuits[ref.name], lost)
                nf = floor.get((ref.name, data.method), {})
                chance = _chance(ref, own[key]["size"])
                # Per-probe values of the fixed metrics (``Point.fixed`` holds their means over probes).
                fixed = {
                    "base_circuit_faithfulness": own[key]["base_circuit_faithfulness"],
                    "preservation_chance": chance[0],
                    "jaccard_chance": chance[1],
                }
                rows.append(
                    {
                        "trial": row["trial"],
                        "training": row["method"],
                        "init": row["init"],
                        "learning_rate": row["learning_rate"],
                        "seed": row["seed"],
                        "step": row["step"],
                        "model": model,
                        "target_accuracy": row["target/accuracy"],
                        "kl_to_base": row.get("kl_to_base") or 0.0,
                        "probe": ref.name,
                        "patching": data.method,
                        "status": status,
                        "in_means": ref.in_means,
                        "in_forgetting": ref.in_forgetting,
                        "probe_accuracy": get("probe_accuracy"),
                        "probe_mean_ld": get("probe_mean_ld"),
                        "gap": get("gap"),
                        "base_gap": data.competence[ref.name].gap if ref.base.gap is None else ref.base.gap,
                        "lost": lost,
                        "circuit_size": own[key]["size"],
                        # Lost is lost everywhere: no number divided by the checkpoint's own (vanished) gap.
                        "faithfulness": None if lost else own[key]["faithfulness"],
                        "effect_spearman": None
                        if lost
                        else effect_spearman(
                            base_effects[(ref.name, data.method)], _effects_frame(point, ref)
                        ),
                        "noise_floor_preservation": nf.get("preservation"),
                        "noise_floor_jaccard": nf.get("jaccard"),
                        "noise_floor_vulnerability": nf.get("circuit_vulnerability"),
                        **_metric_cells(point, ref, lost, get, fixed),
                    }
                )
    table = pl.DataFrame(rows, schema_overrides=dict.fromkeys(NULLABLE, pl.Float64), infer_schema_length=None)
    return (
        table.with_columns(
            # Not distinguishable from base: the model keeps as much of the base circuit as the base keeps of
            # itself on a resample of its own items (the noise floor's 5th percentile).
            (pl.col("preservation") >= pl.col("noise_floor_preservation")).alias("within_noise_floor"),
            *_above_chance(),
        )
        .pipe(_ordered, CHECKPOINT_COLUMNS)
        .sort("trial", "step", "probe", "patching")
    )


def _metric_cells(point: Point, ref: ProbeReference, lost: bool, get, fixed: dict) -> dict:
    """A checkpoints row's metric columns (``dcv.metrics``) for one probe: per-probe numbers from its
    parts (``get``) or ``fixed``'s per-probe values, null by each metric's lost rule; per-model numbers
    from the point."""
    cells = {}
    for m in METRICS.values():
        if m.source == "results" or m.counts:
            continue  # the results row's own columns; a count's flag (``lost``) is a column of its own
        if m.per == "model":
            cells[m.name] = _or_none(point.fixed[m.name])
        elif (m.lost_null and lost) or (m.needs_circuit and not ref.circuit.size):
            cells[m.name] = None
        else:
            cells[m.name] = get(m.name) if m.source == "parts" else fixed[m.name]
    return cells


def _ordered(frame: pl.DataFrame, columns: Sequence[str]) -> pl.DataFrame:
    """``frame`` with ``columns`` first, in that order, then any other column (a metric not placed)."""
    return frame.select(*columns, *[c for c in frame.columns if c not in columns])


def _above_chance() -> list[pl.Expr]:
    """Each metric with a chance level minus it (P and J; null where either is)."""
    return [
        (pl.col(m.name) - pl.col(m.chance)).alias(f"{m.name}_above_chance")
        for m in METRICS.values()
        if m.chance
    ]


def _effects_frame(point: Point, ref: ProbeReference) -> pl.DataFrame:
    """The point's effects on one probe as a (layer-free) frame for ``effect_spearman``."""
    parts = point.probes[ref.name]
    with np.errstate(divide="ignore", invalid="ignore"):  # a gap of 0 (a probe not done): ranks only
        effect = parts.delta.mean(axis=1) / parts.denominator.mean()
    index = list(range(len(effect)))
    return pl.DataFrame({"layer": index, "head": [0] * len(index), "effect": effect})


def bench_columns(results: pl.DataFrame) -> list[str]:
    """The results table's lm-eval accuracy columns (``bench/<task>/acc``), one per benchmark."""
    return [c for c in results.columns if c.startswith("bench/") and c.endswith("/acc")]


def _bench_forgetting(base: pl.DataFrame, row: dict, columns: list[str]) -> float | None:
    """Mean over benchmarks of base accuracy - checkpoint accuracy; None without benchmark scores."""
    drops = [base[c][0] - row[c] for c in columns if not base.is_empty() and None not in (base[c][0], row[c])]
    return float(np.mean(drops)) if drops else None


def benchmark_table(results: pl.DataFrame) -> pl.DataFrame:
    """Every checkpoint's lm-eval scores (the results table's ``bench/`` columns)."""
    columns = [c for c in results.columns if c.startswith("bench/")]
    return results.select("trial", "method", "init", "step", *columns).sort("trial", "step")


def summary_table(checkpoints: pl.DataFrame) -> pl.DataFrame:
    """Per checkpoint and patching method, means over the probes in means (competent, circuit reached
    tau, prior capabilities only): lost probes count in ``n_lost`` and in forgetting, not in P, J or V."""
    keys = list(SUMMARY_KEYS)
    first = [m.name for m in METRICS.values() if m.per == "model"]  # one number per checkpoint
    per_probe = [m for m in METRICS.values() if m.per == "probe"]

    def means(circuit: bool) -> list[pl.Expr]:
        return [
            pl.col(m.counts).sum().cast(pl.Int64).alias(m.name) if m.counts else pl.col(m.name).mean()
            for m in per_probe
            if m.circuit == circuit
        ]

    every = checkpoints.group_by(keys, maintain_order=True).agg(*[pl.col(c).first() for c in first])
    forgetting = (
        checkpoints.filter(pl.col("in_forgetting"))
        .group_by(keys, maintain_order=True)
        .agg(*means(circuit=False), pl.len().cast(pl.Int64).alias("n_probes_forgetting"))
    )
    circuit = (
        checkpoints.filter(pl.col("in_means"))
        .group_by(keys, maintain_order=True)
        .agg(
            *means(circuit=True),
            *[pl.col(c).mean() for c in ("circuit_size", "faithfulness", *NOISE_FLOOR_COLUMNS)],
            pl.len().cast(pl.Int64).alias("n_probes_circuits"),
        )
    )
    counts = (*[m.name for m in per_probe if m.counts], "n_probes_forgetting", "n_probes_circuits")
    return (
        every.join(forgetting, on=keys, how="left")
        .join(circuit, on=keys, how="left")
        .with_columns(*[pl.col(c).fill_null(0) for c in counts], *_above_chance())
        .pipe(_ordered, SUMMARY_COLUMNS)
        .sort("trial", "step", "patching")
    )


def noise_floor_table(
    cfg: ExperimentConfig, inputs: Sequence[Inputs], stored: pl.DataFrame | None
) -> pl.DataFrame:
    """The patching methods' floor from the base model's per-item parts, beside the masks' stored rows."""
    rows = []
    for data in inputs:
        if not patching_method(data.method).item_parts or not cfg.circuits.noise_floor:
            continue
        base = data.points[(BASE_MODEL, 0)]
        for ref in data.refs:
            if not ref.circuit.size:
                continue
            parts = base.probes[ref.name]
            draws = bootstrap_floor(
                parts.delta, parts.denominator, ref.circuit, cfg.circuits.noise_floor_resamples, seed=0
            )
            rows.append(
                floor_row(ref.name, data.method, "bootstrap", parts.delta.shape[1], len(ref.circuit), draws)
            )
    computed = pl.DataFrame(rows, schema=NOISE_FLOOR_SCHEMA)
    if stored is None or stored.is_empty() or stored.schema != NOISE_FLOOR_SCHEMA:
        return computed
    return pl.concat([computed, stored]).sort("probe", "method", "kind")


def run_list(inputs: Inputs, summary: pl.DataFrame) -> list[Run]:
    """Every fine-tuning run as matched-comparison points; an RL-after-SFT run's step 0 is its SFT start
    point, never a point of RL."""
    runs = []
    rows = summary.filter(pl.col("patching") == inputs.method)
    for (trial,), frame in rows.group_by("trial", maintain_order=True):
        frame = frame.sort("step")
        method = frame["training"][0]
        kept = frame.filter(~((pl.col("step") == 0) & pl.col("init").str.starts_with("sft:")))
        points = tuple(inputs.points[key] for key in kept.select("model", "step").iter_rows())
        if points:
            runs.append(Run(trial, method, points))
    return runs


HEADLINE_SCHEMA = {
    "patching": pl.String,
    "matched_by": pl.String,  # accuracy | kl | step
    "matched_at": pl.Float64,
    # "ok"; "insufficient runs" (fewer than analysis.min_runs runs of a method reach the level: no numbers);
    # "no variation" (the these-runs CI holds one value: at least 95% of item draws agree)
    "status": pl.String,
    "metric": pl.String,
    "training": pl.String,  # sft | rl | sft-rl
    # primary (analysis.primary) | secondary (another answer metric at a stated level: Holm family) |
    # other (the rest: tables only, no verdict)
    "role": pl.String,
    "mean": pl.Float64,  # over the runs that reach the level
    # These runs: the item bootstrap (probe and target items, every run kept), conditional on the runs.
    "ci_low": pl.Float64,
    "ci_high": pl.Float64,
    "se": pl.Float64,
    "p_runs": pl.Float64,  # sft-rl: the item bootstrap's two-sided p (2 x the smaller tail share)
    "verdict_runs": pl.String,  # sft-rl primary/secondary: higher/lower under SFT in these runs, or not
    # Across seeds (``dcv.matched.across_seeds``): Welch's t on the runs' values, item variance folded in.
    "seed_ci_low": pl.Float64,
    "seed_ci_high": pl.Float64,
    "seed_se": pl.Float64,
    "seed_df": pl.Float64,  # Satterthwaite's
    "p_value": pl.Float64,  # two-sided, unadjusted
    "p_adjusted": pl.Float64,  # primary: p_value; secondary: Holm across the family of its patching method
    "verdict_seeds": pl.String,  # higher/lower under SFT, or not distinguishable at this power
    "mde": pl.Float64,  # sft-rl: (t_{0.975,df} + t_{0.8,df}) x seed_se: 80% power, two-sided 5%
    "runs_needed": pl.Int64,  # runs per method at which the observed difference is the MDE (null: > 100)
    "chance": pl.Float64,  # sft, rl: the value a random head set of the same sizes would score (P, J)
    "n_resamples": pl.Int64,  # item draws in which both methods had a run at the level
    "start_reached": pl.Float64,  # share of draws in which a run's resampled start reached the level
    "n_runs_sft": pl.Int64,
    "n_runs_rl": pl.Int64,
    "n_probe_items": pl.Int64,  # items per probe (the smallest probe's)
    "probe_items": pl.String,  # every probe's items: "ioi 32, capitals 32, induction 16"
    "n_target_items": pl.Int64,  # target test items resampled (0: not stored, accuracy not resampled)
}
HIGHER, LOWER, UNRESOLVED = "higher under SFT", "lower under SFT", "not distinguishable at this power"


def _bootstrap_p(draws: np.ndarray) -> np.ndarray:
    """Two-sided bootstrap p per column: twice the smaller share of finite draws on either side of 0."""
    finite = np.isfinite(draws)
    n = np.maximum(finite.sum(axis=0), 1)
    below = ((draws <= 0) & finite).sum(axis=0) / n
    above = ((draws >= 0) & finite).sum(axis=0) / n
    return np.minimum(1.0, 2 * np.minimum(below, above))


def matched_tables(
    cfg: ExperimentConfig, inputs: Inputs, runs: Sequence[Run], draws: Sequence
) -> tuple[list[dict], list[pl.DataFrame]]:
    """(headline rows, dcv_heads frames) of one patching method on the matched grid (``draws``: the
    item bootstrap's, ``dcv.matched.resample``). Roles and verdicts come from ``assign_roles``."""
    base = inputs.points[(BASE_MODEL, 0)]
    a = cfg.analysis
    levels = grid(runs, base.accuracy, a.accuracy_step, a.kl_levels)
    if a.primary.level is not None and a.primary.level not in levels[a.primary.axis]:
        levels[a.primary.axis] = sorted([*levels[a.primary.axis], a.primary.level])
    c = cfg.circuits
    alpha = 1 - c.ci_level
    compared = compare(runs, inputs.refs, inputs.layout, levels, a.min_runs, c.n_bootstrap, draws=draws)
    n_probe_items = min(ref.base.denominator.shape[0] for ref in inputs.refs)
    probe_items = ", ".join(f"{ref.name} {ref.base.denominator.shape[0]}" for ref in inputs.refs)
    n_target = max((p.correct.shape[0] for r in runs for p in r.points if p.correct is not None), default=0)
    common = {
        "patching": inputs.method,
        "n_probe_items": n_probe_items,
        "probe_items": probe_items,
        "n_target_items": n_target,
    }
    rows, heads = [], []
    for level in compared:
        where = {**common, "matched_by": level.axis, "matched_at": level.value}
        runs_of = {"n_runs_sft": level.n_runs["sft"], "n_runs_rl": level.n_runs["rl"]}
        if not level.used:
            rows.append({**where, **runs_of, "status": "insufficient runs"})
            continue
        bounds = {k: interval(v, c.ci_level) for k, v in level.draws.items()}
        seeds = across_seeds(level.values, level.draws["sft-rl"], n_probe_items, alpha)
        p_runs = _bootstrap_p(level.draws["sft-rl"])
        for metric in HEADLINE_METRICS:
            if metric == MATCHED_ON.get(level.axis):
                continue  # equal to the level by construction: not a comparison
            at = inputs.layout.slices[metric].start
            if not np.isfinite([level.mean[m][at] for m in TRAINING_METHODS]).all():
                continue  # no such number here (no benchmarks, no probe in means)
            chance = METRICS[metric].chance
            for training in (*TRAINING_METHODS, "sft-rl"):
                low, high, se, valid = (b[at] for b in bounds[training])
                # The CI holds one value (e.g. no run lost a probe, or 95% of draws keep every circuit head):
                # a fact about these runs and items, printed as such, never as an interval.
                constant = bool(low == high)
                row = {
                    **where,
                    **runs_of,
                    "status": "no variation" if constant else "ok",
                    "metric": metric,
                    "training": training,
                    "role": "other",
                    "ci_low": float(low),
                    "ci_high": float(high),
                    "se": float(se),
                    "n_resamples": int(valid),
                    "start_reached": level.start_reached,
                }
                if training == "sft-rl":
                    needed = seeds.runs_needed[at]
                    row |= {
                        "mean": float(seeds.difference[at]),
                        "p_runs": float(p_runs[at]),
                        "seed_ci_low": _or_none(seeds.ci_low[at]),
                        "seed_ci_high": _or_none(seeds.ci_high[at]),
                        "seed_se": float(seeds.se[at]),
                        "seed_df": _or_none(seeds.df[at]),
                        "p_value": _or_none(seeds.p[at]),
                        "mde": _or_none(seeds.mde[at]),
                        "runs_needed": int(needed) if np.isfinite(needed) else None,
                    }
                else:
                    row["mean"] = float(level.mean[training][at])
                    if chance is not None and chance in inputs.layout.slices:
                        row["chance"] = _or_none(level.mean[training][inputs.layout.slices[chance].start])
                rows.append(row)
        heads += _dcv_heads(cfg, inputs, level, bounds["sft-rl"])
    return assign_roles(cfg, rows, alpha), heads


def stated_levels(rows: Sequence[dict]) -> dict[str, float]:
    """Per axis, the level the answer states: the highest level both methods reach with enough runs."""
    out: dict[str, float] = {}
    for row in rows:
        if row["status"] != "insufficient runs":
            axis = row["matched_by"]
            out[axis] = max(out.get(axis, row["matched_at"]), row["matched_at"])
    return out


def assign_roles(cfg: ExperimentConfig, rows: list[dict], alpha: float) -> list[dict]:
    """Mark the primary endpoint (``analysis.primary``) and the secondary family (the other answer
    metrics at each axis's stated level), Holm-adjust the family's p-values (across seeds and these
    runs alike) and give both levels' verdicts; every other row keeps role "other" and no verdict."""
    primary = cfg.analysis.primary
    levels = stated_levels(rows)
    primary_level = primary.level if primary.level is not None else levels.get(primary.axis)
    family = []
    for row in rows:
        if row.get("training") != "sft-rl" or row["status"] == "insufficient runs":
            continue
        at_primary = row["matched_by"] == primary.axis and row["matched_at"] == primary_level
        if at_primary and row["metric"] == primary.metric:
            row["role"] = "primary"
        elif row["metric"] in ANSWER_METRICS and levels.get(row["matched_by"]) == row["matched_at"]:
            row["role"] = "secondary"
            family.append(row)
    seeds = holm([1.0 if r["p_value"] is None else r["p_value"] for r in family])
    runs = holm([r["p_runs"] for r in family])
    for row, p_seeds, p_runs in zip(family, seeds, runs, strict=True):
        row["p_adjusted"] = p_seeds
        _verdicts(row, p_seeds, p_runs, alpha)
    for row in rows:
        if row.get("role") == "primary":
            row["p_adjusted"] = row["p_value"]
            _verdicts(row, 1.0 if row["p_value"] is None else row["p_value"], row["p_runs"], alpha)
    return rows


def _verdicts(row: dict, p_seeds: float, p_runs: float, alpha: float) -> None:
    direction = HIGHER if row["mean"] > 0 else LOWER
    if row["status"] == "no variation":
        row["verdict_runs"] = row["verdict_seeds"] = "no variation"
        return
    row["verdict_runs"] = direction if p_runs < alpha else UNRESOLVED
    row["verdict_seeds"] = direction if p_seeds < alpha else UNRESOLVED


def _dcv_heads(cfg: ExperimentConfig, inputs: Inputs, level, bounds) -> list[pl.DataFrame]:
    """DCV_h = v_h(SFT) - v_h(RL) of every base-circuit head at one used level, with its CI."""
    frames = []
    base = inputs.points[(BASE_MODEL, 0)]
    low, high, _, _ = bounds
    for ref in inputs.refs:
        if not ref.circuit.size:
            continue
        span = inputs.layout.slices[f"{ref.name}/v"]
        frame = _effects_frame(base, ref)
        base_effect = frame["effect"].to_numpy()[ref.circuit]
        n_heads = base.probes[ref.name].delta.shape[0]
        n_per_layer = n_heads // inputs.n_layers
        dcv = level.mean["sft"][span] - level.mean["rl"][span]
        frames.append(
            pl.DataFrame(
                {
                    "probe": ref.name,
                    "patching": inputs.method,
                    "by": level.axis,
                    "value": level.value,
                    "layer": (ref.circuit // n_per_layer).astype(np.int32),
                    "head": (ref.circuit % n_per_layer).astype(np.int32),
                    "base_effect": base_effect,
                    "dcv": dcv,
                    "ci_low": low[span],
                    "ci_high": high[span],
                    "n_sft": level.n_runs["sft"],
                    "n_rl": level.n_runs["rl"],
                    "in_means": ref.in_means,
                }
            )
            .with_columns(
                # DCV_h |e_h(base)| = e_h(RL) - e_h(SFT) in the base direction: for masks the seed paper's
                # m_h(RL) - m_h(SFT).
                (pl.col("dcv") * pl.col("base_effect").abs()).alias("effect_gap")
            )
            .with_columns((pl.col("effect_gap") > cfg.circuits.mask.weakened_delta).alias("sft_weakened"))
        )
    return frames


def correlation_table(checkpoints: pl.DataFrame, summary: pl.DataFrame) -> pl.DataFrame:
    """Spearman of V(M) with forgetting over fine-tuned checkpoints (step > 0), probes in means."""
    tuned_probes = checkpoints.filter((pl.col("step") > 0) & pl.col("in_means"))
    tuned_mean = summary.filter(pl.col("step") > 0).with_columns(pl.lit("mean").alias("probe"))
    rows = []
    for frame in (tuned_probes, tuned_mean):
        for (probe, patching), group in frame.group_by("probe", "patching", maintain_order=True):
            for training in (*TRAINING_METHODS, "pooled"):
                rows_of = group if training == "pooled" else group.filter(pl.col("training") == training)
                v = rows_of["circuit_vulnerability"].cast(pl.Float64).fill_null(np.nan).to_numpy()
                rows.append(
                    {
                        "probe": probe,
                        "patching": patching,
                        "training": training,
                        "n_checkpoints": rows_of.height,
                        "spearman_forgetting": spearman(v, rows_of["forgetting"].to_numpy()),
                        "spearman_forgetting_ld": spearman(v, rows_of["forgetting_ld"].to_numpy()),
                    }
                )
    schema = {
        "probe": pl.String,
        "patching": pl.String,
        "training": pl.String,
        "n_checkpoints": pl.Int64,
        "spearman_forgetting": pl.Float64,
        "spearman_forgetting_ld": pl.Float64,
    }
    return pl.DataFrame(rows, schema=schema).sort("probe", "patching", "training")


def after_sft_table(summary: pl.DataFrame) -> pl.DataFrame:
    """GRPO after SFT against the SFT checkpoint it started from (its own step 0): does RL restore the
    base circuits (preservation up, V down) or only stop their loss?"""
    columns = ("target_accuracy", "forgetting", "preservation", "circuit_vulnerability")
    runs = summary.filter(pl.col("init").str.starts_with("sft:"))
    start = runs.filter(pl.col("step") == 0).select(
        "trial", "patching", *[pl.col(c).alias(f"{c}_start") for c in columns]
    )
    return (
        runs.filter(pl.col("step") > 0)
        .join(start, on=["trial", "patching"], how="inner")
        .select(
            "trial",
            "init",
            "step",
            "patching",
            *[x for c in columns for x in (pl.col(f"{c}_start"), pl.col(c))],
            (pl.col("preservation") > pl.col("preservation_start")).alias("restores_circuit"),
        )
        .sort("trial", "step", "patching")
    )


def final_checkpoints(summary: pl.DataFrame) -> pl.DataFrame:
    """The last evaluated step of every fine-tuned run."""
    last = summary.group_by("trial", "patching").agg(pl.col("step").max())
    return summary.filter(pl.col("step") > 0).join(last, on=["trial", "patching", "step"], how="semi")


def paper_table(summary: pl.DataFrame) -> pl.DataFrame:
    """Per discovery method, ours beside the seed paper's: circuit size, base-circuit retention (%) and
    faithfulness of the base model and of each method's final checkpoints (means over runs and probes)."""
    base = summary.filter(pl.col("model") == BASE_MODEL)
    final = final_checkpoints(summary)
    rows = []
    for patching in sorted(summary["patching"].unique().to_list()):
        models = {"base": base.filter(pl.col("patching") == patching)} | {
            t: final.filter((pl.col("patching") == patching) & (pl.col("training") == t))
            for t in TRAINING_METHODS
        }
        floor = base.filter(pl.col("patching") == patching)["noise_floor_preservation"].drop_nulls()
        for quantity, column, scale in (
            ("circuit_size", "circuit_size", 1.0),
            ("retention_pct", "preservation", 100.0),
            ("faithfulness", "faithfulness", 1.0),
        ):
            means = {m: f[column].mean() for m, f in models.items()}  # None when no value
            means = {m: None if v is None else scale * v for m, v in means.items()}
            chance = {}
            if quantity == "retention_pct":
                # A random head set of each model's circuit size: retention reads "above chance by d".
                chance = {f"chance_{m}": f["preservation_chance"].mean() for m, f in models.items()}
                chance = {k: None if v is None else 100.0 * v for k, v in chance.items()}
                chance |= {
                    f"paper_chance_{m}": 100.0 * n / PAPER_HEADS for m, n in PAPER["circuit_size"].items()
                }
            rows.append(
                {
                    "patching": patching,
                    "quantity": quantity,
                    **means,
                    "n_runs_sft": models["sft"].height,
                    "n_runs_rl": models["rl"].height,
                    "noise_floor_retention_pct": 100.0 * floor.mean()
                    if quantity == "retention_pct" and floor.len()
                    else None,
                    **{f"paper_{m}": PAPER[quantity][m] for m in ("base", "sft", "rl")},
                    **chance,
                }
            )
    schema = {
        "patching": pl.String,
        "quantity": pl.String,
        "base": pl.Float64,
        "sft": pl.Float64,
        "rl": pl.Float64,
        "n_runs_sft": pl.Int64,
        "n_runs_rl": pl.Int64,
        "noise_floor_retention_pct": pl.Float64,
        "paper_base": pl.Float64,
        "paper_sft": pl.Float64,
        "paper_rl": pl.Float64,
        # retention_pct row only: the retention (%) a random head set of the model's circuit size would score
        **{f"chance_{m}": pl.Float64 for m in ("base", "sft", "rl")},
        **{f"paper_chance_{m}": pl.Float64 for m in ("base", "sft", "rl")},
    }
    return pl.DataFrame(rows, schema=schema)


CMAP_TABLE_SCHEMA = {
    "patching": pl.String,  # the circuit method whose base circuit the heads are
    "model": pl.String,
    "trial": pl.String,
    "step": pl.Int64,
    "training": pl.String,  # sft | rl (the results table's method)
    "probe": pl.String,
    "direction": pl.String,  # ckpt_into_base | base_into_ckpt
    "mean_abs_cmap_circuit": pl.Float64,  # mean |cmap_h| over the probe's base-circuit heads
    "circuit_ci_low": pl.Float64,  # its percentile CI over B resamples of the probe items
    "circuit_ci_high": pl.Float64,
    "mean_abs_cmap_all": pl.Float64,  # mean |cmap_h| over every head cmap patched (n_heads; no CI)
    "n_circuit_heads": pl.Int64,
    "n_heads": pl.Int64,
    "n_items": pl.Int64,
}
CMAP_DIRECTION = "ckpt_into_base"  # the direction the ``cmap`` predictor reads


def mean_cmap(cmap: pl.DataFrame | None, model: str, circuits: dict[str, list[Head]]) -> float:
    """A checkpoint's CMAP predictor: mean over ``circuits``' probes (those in the means) of the mean
    |cmap_h| (direction ckpt_into_base) over the probe's base-circuit heads; 0 for the base, NaN where
    not measured."""
    if cmap is None:
        return float("nan")
    if model == BASE_MODEL:
        return 0.0
    rows = cmap.filter((pl.col("model") == model) & (pl.col("direction") == CMAP_DIRECTION))
    means = []
    for probe, heads in circuits.items():
        if not heads:
            continue
        frame = rows.filter(pl.col("probe") == probe)
        values = {(la, h): e for la, h, e in frame.select("layer", "head", "effect").iter_rows()}
        if any(head not in values for head in heads):
            return float("nan")
        means.append(float(np.mean([abs(values[head]) for head in heads])))
    return float(np.mean(means)) if means else float("nan")


def cmap_table(
    cfg: ExperimentConfig,
    results: pl.DataFrame,
    circuits: pl.DataFrame,
    methods: Sequence[str],
    cmap: pl.DataFrame | None,
) -> pl.DataFrame:
    """CMAP_TABLE_SCHEMA: per circuit method, checkpoint, probe and direction, mean |cmap| over the
    probe's base-circuit heads (with an item-bootstrap CI: ``circuits.n_bootstrap`` resamples of the
    probe items, cmap = mean(delta) / mean(base gap) redone in each) and over every head."""
    if cmap is None or cmap.is_empty():
        return pl.DataFrame(schema=CMAP_TABLE_SCHEMA)
    training = dict(results.select("trial", "method").unique("trial").iter_rows())
    rng = np.random.default_rng(0)
    rows = []
    ordered = cmap.sort("model", "probe", "direction", "layer", "head")
    keys = ("model", "probe", "direction")
    for (model, probe, direction), frame in ordered.group_by(keys, maintain_order=True):
        delta = np.asarray(frame["item_delta"].to_list(), dtype=np.float64)  # [heads, items]
        denominator = np.asarray(frame["item_denominator"][0], dtype=np.float64)  # [items]
        n_items = denominator.shape[0]
        draws = rng.integers(0, n_items, size=(cfg.circuits.n_bootstrap, n_items))
        # [B, heads]: every head's cmap over each resample of the items
        resampled = np.abs(delta[:, draws].mean(axis=2).T / denominator[draws].mean(axis=1)[:, None])
        index = {(la, h): i for i, (la, h) in enumerate(frame.select("layer", "head").iter_rows())}
        first = frame.row(0, named=True)
        for method in methods:
            base = circuits.filter(
                (pl.col("model") == BASE_MODEL) & (pl.col("probe") == probe) & (pl.col("method") == method)
            )
            circuit = circuit_heads(base.row(0, named=True)) if base.height else []
            heads = [index[h] for h in circuit if h in index]
            if len(heads) < len(circuit):
                heads = []  # a circuit head that cmap did not patch: the circuit's mean is not measured
            values = np.abs(frame["effect"].to_numpy())
            low = high = None
            if heads:
                circuit_draws = resampled[:, heads].mean(axis=1, keepdims=True)
                lo, hi, _, _ = interval(circuit_draws, cfg.circuits.ci_level)
                low, high = _or_none(lo[0]), _or_none(hi[0])
            rows.append(
                {
                    "patching": method,
                    "model": model,
                    "trial": first["trial"],
                    "step": first["step"],
                    "training": training.get(first["trial"]),
                    "probe": probe,
                    "direction": direction,
                    "mean_abs_cmap_circuit": float(values[heads].mean()) if heads else None,
                    "circuit_ci_low": low,
                    "circuit_ci_high": high,
                    "mean_abs_cmap_all": float(values.mean()),
                    "n_circuit_heads": len(heads),
                    "n_heads": frame.height,
                    "n_items": n_items,
                }
            )
    return pl.DataFrame(rows, schema=CMAP_TABLE_SCHEMA)


def comparison_slots(cfg: ExperimentConfig, frame: pl.DataFrame) -> pl.DataFrame:
    """``frame``'s rows of the two compared methods (comparison.methods), their ``method`` renamed to the
    analysis' slots: the first to "sft", the second to "rl" (TRAINING_METHODS), so every table keeps its
    columns whatever the labels (DPO vs RLVR: the sft columns hold DPO). Rows of other labels (a third
    method of external runs) are left out. The sweep's own labels are the slots: nothing changes."""
    first, second = cfg.comparison.methods
    if (first, second) == TRAINING_METHODS:
        return frame.filter(pl.col("method").is_in(TRAINING_METHODS))
    slots = {first: TRAINING_METHODS[0], second: TRAINING_METHODS[1]}
    return frame.filter(pl.col("method").is_in(list(slots))).with_columns(
        pl.col("method").replace_strict(slots, return_dtype=pl.String)
    )


def analyze(
    cfg: ExperimentConfig,
    results: pl.DataFrame,
    effects: pl.DataFrame,
    circuits: pl.DataFrame,
    noise_floor: pl.DataFrame | None = None,
    weight_change: pl.DataFrame | None = None,
    cmap: pl.DataFrame | None = None,
) -> dict[str, pl.DataFrame]:
    """Every analysis table (TABLES) from the stored results, effects, circuits, (masks') noise-floor,
    weight-change and CMAP tables (None: that stage did not run)."""
    results = comparison_slots(cfg, results)
    if weight_change is not None and "method" in weight_change.columns:
        weight_change = comparison_slots(cfg, weight_change)
    heads = effects.filter(pl.col("model") == BASE_MODEL)
    shape = (int(heads["layer"].max()) + 1, int(heads["head"].max()) + 1)
    changes = head_changes(weight_change)
    means = {m: float(c.mean()) for m, c in changes.items()} if weight_change is not None else None
    # cmap is a change measure against the base, not a circuit: no inputs of its own.
    methods = circuit_methods(cfg.patching.methods)
    inputs = [build_inputs(cfg, results, effects, circuits, m, means, cmap) for m in methods]
    floor = noise_floor_table(cfg, inputs, noise_floor)
    checkpoints = checkpoint_table(cfg, inputs, circuits, floor)
    summary = summary_table(checkpoints)
    headline, heads_frames, predictors, weight_function = [], [], [], []
    for data in inputs:
        runs = run_list(data, summary)
        # One set of bootstrap draws per patching method: the matched comparison and the predictors.
        draws = resample(runs, data.refs, data.layout, cfg.circuits.n_bootstrap)
        rows, frames = matched_tables(cfg, data, runs, draws)
        headline += rows
        heads_frames += frames
        observed = {
            r.name: np.stack([checkpoint_numbers(p, data.refs, data.layout) for p in r.points]) for r in runs
        }
        a, level = cfg.analysis, cfg.circuits.ci_level
        predictors.append(
            predictor_table(
                data.method,
                runs,
                observed,
                data.layout,
                draws,
                a.predictors,
                level,
                refs=data.refs,
                item_split=a.predictor_item_split,
            )
        )
        tuned = [
            (row["method"], row["trial"], row["step"], row["model"], point_numbers(data, row))
            for row in data.rows
            if row["step"] > 0
        ]
        weight_function.append(weight_function_table(data.method, tuned, data.refs, data.layout, changes))
    return {
        "base_circuits": base_circuit_table(circuits, shape, inputs),
        "checkpoints": checkpoints,
        "summary": summary,
        "dcv_heads": pl.concat(heads_frames) if heads_frames else pl.DataFrame(),
        "correlations": correlation_table(checkpoints, summary),
        "headline": pl.DataFrame(headline, schema=HEADLINE_SCHEMA),
        "noise_floor": floor,
        "after_sft": after_sft_table(summary),
        "benchmarks": benchmark_table(results),
        "paper": paper_table(summary),
        "predictors": pl.concat(predictors) if predictors else pl.DataFrame(schema=PREDICTORS_SCHEMA),
        "weight_vs_function": pl.concat(weight_function)
        if weight_function
        else pl.DataFrame(schema=WEIGHT_FUNCTION_SCHEMA),
        "weight_change_heads": weight_change_heads(weight_change),
        "cmap": cmap_table(cfg, results, circuits, methods, cmap),
        **curve_tables(faithfulness_curves(circuits), checkpoints),
    }


def point_numbers(data: Inputs, row: dict) -> np.ndarray:
    """A results row's checkpoint vector (all items) for one patching method."""
    return checkpoint_numbers(data.points[(row["model"], row["step"])], data.refs, data.layout)


def write_analysis(tables: dict[str, pl.DataFrame], storage_root: Path) -> list[Path]:
    """Each table as ``<storage>/analysis/<name>.parquet`` and ``.csv`` (atomic); returns the paths."""
    paths = []
    for name, table in tables.items():
        path = write_parquet(table, analysis_dir(storage_root) / f"{name}.parquet")
        with atomic_path(path.with_suffix(".csv")) as tmp:
            table.write_csv(tmp)
        paths += [path, path.with_suffix(".csv")]
    return paths


def read_analysis(storage_root: Path) -> dict[str, pl.DataFrame]:
    """The stored analysis tables; a missing one is an error naming its path."""
    tables = {}
    for name in TABLES:
        path = analysis_dir(storage_root) / f"{name}.parquet"
        table = read_parquet(path)
        if table is None:
            raise FileNotFoundError(f"{path}: analysis table missing; run `dcv run CONFIG` first")
        tables[name] = table
    return tables
