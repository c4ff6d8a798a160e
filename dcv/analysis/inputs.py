"""What every table of one patching method reads: probe references (the base model's parts and circuit,
the competence guard) and every model's point (its per-item parts, own circuit and fixed numbers), from
the stored results, effects and circuits tables (``build_inputs``); the comparison's slots and the
checkpoint's CMAP predictor (``mean_cmap``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from dcv.circuits.chance import chance_jaccard, chance_preservation
from dcv.circuits.competence import Competence, base_competence
from dcv.circuits.methods import ITEM_PARTS_METHODS, patching_method
from dcv.config import ExperimentConfig
from dcv.matched import (
    TRAINING_METHODS,
    Layout,
    Point,
    ProbeParts,
    ProbeReference,
    checkpoint_numbers,
    probe_numbers,
)
from dcv.metrics import FIXED_METRICS
from dcv.storage import BASE_MODEL, checkpoint_model
from dcv.tables import Head, circuit_heads

TARGET_PROBE = "chem"  # the target task's own probe: reported on its own, never in prior-capability means
TARGET_ITEMS = "target/item_correct"  # results-table column: per test item, 1 if answered correctly


def with_model(results: pl.DataFrame) -> pl.DataFrame:
    models = [checkpoint_model(t, s, i) for t, s, i in results.select("trial", "step", "init").iter_rows()]
    return results.with_columns(pl.Series("model", models, dtype=pl.String))


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
    models = with_model(results).unique("model", maintain_order=True)
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


def chance_levels(ref: ProbeReference, model_size: int) -> tuple[float | None, float | None]:
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
    for row in with_model(results).iter_rows(named=True):
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
        chance = np.array([chance_levels(r, len(circuit[r.name])) for r in kept], dtype=np.float64).reshape(
            -1, 2
        )
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
                "compute every fixed metric in dcv.analysis.inputs.build_inputs"
            )


def or_none(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def _mean_change(weight_change: dict[str, float] | None, model: str) -> float:
    if weight_change is None:
        return float("nan")
    return 0.0 if model == BASE_MODEL else weight_change.get(model, float("nan"))


def _base_row(results: pl.DataFrame) -> dict:
    base = results.filter((pl.col("step") == 0) & (pl.col("init") == "base"))
    if base.is_empty():
        raise ValueError("the results table has no step-0 row of a trial started from the base model")
    return base.row(0, named=True)


def effects_frame(point: Point, ref: ProbeReference) -> pl.DataFrame:
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


def point_numbers(data: Inputs, row: dict) -> np.ndarray:
    """A results row's checkpoint vector (all items) for one patching method."""
    return checkpoint_numbers(data.points[(row["model"], row["step"])], data.refs, data.layout)


@dataclass(frozen=True)
class Analysis:
    """What the table families read (``dcv.analysis.FAMILIES``): the stored tables (the two compared
    methods in the analysis' slots, ``comparison_slots``) and what is built once from them."""

    cfg: ExperimentConfig
    results: pl.DataFrame
    circuits: pl.DataFrame
    shape: tuple[int, int]  # the model's (layers, heads per layer)
    methods: list[str]  # the circuit methods (cmap has no inputs of its own)
    inputs: list[Inputs]  # one per circuit method
    floor: pl.DataFrame  # the noise_floor table
    checkpoints: pl.DataFrame
    summary: pl.DataFrame
    headline: list[dict]  # every method's headline rows
    dcv_heads: list[pl.DataFrame]
    predictors: list[pl.DataFrame]  # one per method
    weight_vs_function: list[pl.DataFrame]
    weight_change: pl.DataFrame | None  # the weight-change stage's table (None: not run)
    cmap: pl.DataFrame | None  # the patching stage's CMAP table (None: not measured)
    pairs: list[dict]  # the pairs table's rows (comparison.each_pair; else none)
