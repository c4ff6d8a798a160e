"""The analysis: from the results, patching and circuits tables to the numbers the report shows.

Pure polars/numpy on stored tables (no model, no Ray), so ``dcv report`` can rebuild it all. ``analyze``
builds what every table reads once (``inputs``: probe references, points, the ``Analysis`` record), then
each family module of this package (``FAMILIES``: checkpoints, noise_floor, headline, pairs, predictors,
paper, cmap, weight_change, curves) builds its tables with its schema. Each family module also holds its
tables' report section(s) (``section``: ``Page`` -> ``Block``s); ``answer`` holds the report's first
section, the answer's prose, read from the headline, base-circuit and calibration tables (also printed by
``dcv run`` and logged to MLflow); ``dcv.report.SECTIONS`` orders them (the weight-change heads show only as
a figure: that family has none). Tables (``analyze`` returns them by
name; ``write_analysis`` stores each as parquet and CSV under ``<storage>/analysis/``):

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
- ``pairs``: with ``comparison.each_pair`` (external runs of 3+ labels), the headline of every pair of
  labels (``first``, ``second``), each pair analysed as the chosen pair would be (``compare_pair``), its
  verdicts Bonferroni-corrected for the number of pairs (``dcv.analysis.pairs``); empty otherwise.
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

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from dcv.analysis import (
    checkpoints,
    cmap,
    curves,
    headline,
    noise_floor,
    pairs,
    paper,
    predictors,
    weight_change,
)
from dcv.analysis.checkpoints import checkpoint_table, summary_table
from dcv.analysis.headline import matched_tables, run_list
from dcv.analysis.inputs import Analysis, Inputs, build_inputs, comparison_slots
from dcv.analysis.noise_floor import noise_floor_table
from dcv.analysis.weight_change import head_changes
from dcv.circuits.methods import circuit_methods
from dcv.config import ExperimentConfig
from dcv.matched import Run, resample
from dcv.storage import BASE_MODEL, analysis_dir, atomic_path, read_parquet, write_parquet

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
    "pairs",
)
# The table families: each module's ``build`` gives its tables from the ``Analysis`` record.
FAMILIES = (checkpoints, noise_floor, headline, pairs, predictors, paper, cmap, weight_change, curves)


@dataclass(frozen=True)
class Stored:
    """The stored tables ``analyze`` reads (None: that stage did not run), as dcv wrote them: every label."""

    results: pl.DataFrame
    effects: pl.DataFrame
    circuits: pl.DataFrame
    noise_floor: pl.DataFrame | None
    weight_change: pl.DataFrame | None
    cmap: pl.DataFrame | None


@dataclass(frozen=True)
class Compared:
    """One pair of labels (comparison.methods) in the analysis' slots, and the matched comparison of each
    circuit method: what the headline of that pair is built from."""

    results: pl.DataFrame  # the pair's rows, its labels renamed to the slots (``comparison_slots``)
    weight_change: pl.DataFrame | None  # likewise (None: the stage did not run)
    changes: dict  # ``head_changes`` of the pair's weight-change rows
    methods: list[str]  # the circuit methods (cmap has no inputs of its own)
    inputs: list[Inputs]  # one per circuit method
    floor: pl.DataFrame
    checkpoints: pl.DataFrame
    summary: pl.DataFrame
    runs: list[list[Run]]  # per circuit method
    draws: list  # per circuit method: the item bootstrap's draws (``dcv.matched.resample``)
    headline: list[dict]  # every circuit method's headline rows
    dcv_heads: list[pl.DataFrame]


def compare_pair(cfg: ExperimentConfig, stored: Stored) -> Compared:
    """The matched comparison of the pair ``cfg.comparison.methods``, every circuit method."""
    results = comparison_slots(cfg, stored.results)
    weight_change = stored.weight_change
    if weight_change is not None and "method" in weight_change.columns:
        weight_change = comparison_slots(cfg, weight_change)
    changes = head_changes(weight_change)
    means = {m: float(c.mean()) for m, c in changes.items()} if weight_change is not None else None
    # cmap is a change measure against the base, not a circuit: no inputs of its own.
    methods = circuit_methods(cfg.patching.methods)
    inputs = [
        build_inputs(cfg, results, stored.effects, stored.circuits, m, means, stored.cmap) for m in methods
    ]
    floor = noise_floor_table(cfg, inputs, stored.noise_floor)
    checkpoint_rows = checkpoint_table(cfg, inputs, stored.circuits, floor)
    summary = summary_table(checkpoint_rows)
    all_runs, all_draws, rows, heads_frames = [], [], [], []
    for data in inputs:
        runs = run_list(data, summary)
        # One set of bootstrap draws per patching method: the matched comparison and the predictors.
        draws = resample(runs, data.refs, data.layout, cfg.circuits.n_bootstrap)
        method_rows, frames = matched_tables(cfg, data, runs, draws)
        all_runs.append(runs)
        all_draws.append(draws)
        rows += method_rows
        heads_frames += frames
    return Compared(
        results,
        weight_change,
        changes,
        methods,
        inputs,
        floor,
        checkpoint_rows,
        summary,
        all_runs,
        all_draws,
        rows,
        heads_frames,
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
    stored = Stored(results, effects, circuits, noise_floor, weight_change, cmap)
    c = compare_pair(cfg, stored)
    heads = effects.filter(pl.col("model") == BASE_MODEL)
    shape = (int(heads["layer"].max()) + 1, int(heads["head"].max()) + 1)
    predictor_frames, weight_function = [], []
    for data, runs, draws in zip(c.inputs, c.runs, c.draws, strict=True):
        fits, weight_vs_function = predictors.method_tables(cfg, data, runs, draws, c.changes)
        predictor_frames.append(fits)
        weight_function.append(weight_vs_function)
    pair_rows = pairs.pairs_rows(cfg, c.headline, lambda pair_cfg: compare_pair(pair_cfg, stored).headline)
    a = Analysis(
        cfg,
        c.results,
        circuits,
        shape,
        c.methods,
        c.inputs,
        c.floor,
        c.checkpoints,
        c.summary,
        c.headline,
        c.dcv_heads,
        predictor_frames,
        weight_function,
        c.weight_change,
        cmap,
        pair_rows,
    )
    tables = {name: table for family in FAMILIES for name, table in family.build(a).items()}
    return {name: tables[name] for name in TABLES}


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
