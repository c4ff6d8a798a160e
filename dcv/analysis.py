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
  A trial's step 0 from the base is the base model (everything 0 or 1 there).
- ``summary``: per (trial, step, patching method), the means over probes.
- ``dcv_heads``: per probe, patching method and matching point (``by`` = step | accuracy), DCV_h =
  v_h(SFT) - v_h(RL) of every base-circuit head, with bootstrap CIs over seeds and probe items.
- ``correlations``: Spearman of V(M) with forgetting across fine-tuned checkpoints, per probe (and the
  mean over probes), per method and pooled.
- ``headline``: SFT vs RL at matched target accuracy and at the last matched step: each metric's mean
  over runs with a bootstrap CI over runs, and the SFT - RL difference.
- ``noise_floor``: the base circuit against itself from disjoint halves of the probe items (and another
  mask seed), ``dcv.circuits.noise_floor``; its halves' preservation and Jaccard stand beside every
  checkpoint's preservation (``noise_floor_*`` columns, ``within_noise_floor``).
- ``after_sft``: each GRPO-after-SFT checkpoint beside the SFT checkpoint it started from (its step 0).
- ``benchmarks``: every checkpoint's lm-eval scores; ``forgetting_bench`` in ``checkpoints`` and
  ``summary`` is the mean over benchmarks of base accuracy - checkpoint accuracy.
- ``paper``: per discovery method, circuit size, base-circuit retention (%) and faithfulness of the base
  model and of each method's final checkpoints, beside the seed paper's figures.

``dcv_heads`` also carries ``effect_gap`` = DCV_h |e_h(base)| = e_h(RL) - e_h(SFT) (for masks the seed
paper's m_h(RL) - m_h(SFT)) and ``sft_weakened`` = effect_gap > ``circuits.mask.weakened_delta``.

Runs of one method at several learning rates are pooled as replicates of that method: the comparison
is meant to be at matched target accuracy, where the learning rate matters through where a run gets.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from dcv.circuits.model_circuits import base_circuits, circuit_heads
from dcv.circuits.pipeline import BASE_MODEL, checkpoint_model
from dcv.circuits.vulnerability import (
    Checkpoint,
    ItemParts,
    circuit_vulnerability,
    dcv_table,
    effect_spearman,
    head_vulnerability,
    interpolation_weights,
    preservation,
)
from dcv.config import ExperimentConfig
from dcv.storage import atomic_path, read_parquet, write_parquet

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
)
# The per-checkpoint metrics the headline compares between methods (columns of ``summary``).
HEADLINE_METRICS = (
    "target_accuracy",
    "forgetting",
    "forgetting_ld",
    "preservation",
    "base_circuit_faithfulness",
    "circuit_vulnerability",
    "kl_to_base",
    "forgetting_bench",
)
TRAINING_METHODS = ("sft", "rl")
NOISE_FLOOR_COLUMNS = ("noise_floor_preservation", "noise_floor_jaccard")
# The seed paper's figures (Qwen2.5-3B-Instruct, 576 heads, learned masks; DESIGN.md), set beside ours.
PAPER = {
    "circuit_size": {"base": 297.0, "sft": 265.0, "rl": 296.0},
    "retention_pct": {"base": 100.0, "sft": 52.0, "rl": 68.0},
    "faithfulness": {"base": 1.02, "sft": 1.04, "rl": 1.12},
}
PAPER_HEADS = 576


def analysis_dir(storage_root: Path) -> Path:
    return Path(storage_root) / "analysis"


def _with_model(results: pl.DataFrame) -> pl.DataFrame:
    models = [checkpoint_model(t, s, i) for t, s, i in results.select("trial", "step", "init").iter_rows()]
    return results.with_columns(pl.Series("model", models, dtype=pl.String))


def base_scores(results: pl.DataFrame, probes: Sequence[str]) -> dict[str, tuple[float, float]]:
    """{probe: (accuracy, mean LD)} of the base model: a step-0 row of a trial started from the base."""
    base = results.filter((pl.col("step") == 0) & (pl.col("init") == "base"))
    if base.is_empty():
        raise ValueError("the results table has no step-0 row of a trial started from the base model")
    row = base.row(0, named=True)
    return {p: (row[f"probe/{p}/accuracy"], row[f"probe/{p}/mean_ld"]) for p in probes}


def base_circuit_table(circuits: pl.DataFrame, shape: tuple[int, int]) -> pl.DataFrame:
    """The base circuits; ``shape`` is the model's (layers, heads per layer)."""
    base = circuits.filter(pl.col("model") == BASE_MODEL)
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
    ).sort("probe", "method")


def checkpoint_table(
    cfg: ExperimentConfig,
    results: pl.DataFrame,
    effects: pl.DataFrame,
    circuits: pl.DataFrame,
    noise_floor: pl.DataFrame | None = None,
) -> pl.DataFrame:
    probes = [p.name for p in cfg.probes]
    bench = bench_columns(results)
    base_bench = results.filter((pl.col("step") == 0) & (pl.col("init") == "base")).head(1)
    floor = {}
    if noise_floor is not None:
        halves = noise_floor.filter(pl.col("kind") == "halves")
        floor = {(r["probe"], r["method"]): r for r in halves.iter_rows(named=True)}
    base = base_scores(results, probes)
    reference = base_circuits(circuits)
    own = {(r["model"], r["probe"], r["method"]): r for r in circuits.iter_rows(named=True)}
    by_model = {key: frame for key, frame in effects.group_by("model", "probe", "method")}
    rows = []
    for row in _with_model(results).iter_rows(named=True):
        for probe in probes:
            for method in cfg.patching.methods:
                key = (row["model"], probe, method)
                if key not in own:
                    raise ValueError(f"no circuit for model {row['model']} probe {probe} ({method}); rerun")
                base_heads = reference[(probe, method)]
                base_effects = by_model[(BASE_MODEL, probe, method)]
                model_effects = by_model[key]
                # An empty base circuit (the base model does not do the probe): nothing to preserve.
                vulnerability = (
                    head_vulnerability(base_effects, model_effects, base_heads) if base_heads else None
                )
                accuracy, mean_ld = row[f"probe/{probe}/accuracy"], row[f"probe/{probe}/mean_ld"]
                rows.append(
                    {
                        "trial": row["trial"],
                        "training": row["method"],
                        "init": row["init"],
                        "learning_rate": row["learning_rate"],
                        "seed": row["seed"],
                        "step": row["step"],
                        "model": row["model"],
                        "target_accuracy": row["target/accuracy"],
                        "kl_to_base": row.get("kl_to_base") or 0.0,
                        "probe": probe,
                        "patching": method,
                        "probe_accuracy": accuracy,
                        "probe_mean_ld": mean_ld,
                        "forgetting": base[probe][0] - accuracy,
                        "forgetting_ld": base[probe][1] - mean_ld,
                        "forgetting_bench": _bench_forgetting(base_bench, row, bench),
                        "circuit_size": own[key]["size"],
                        "faithfulness": own[key]["faithfulness"],
                        "preservation": preservation(base_heads, circuit_heads(own[key]))
                        if base_heads
                        else None,
                        "noise_floor_preservation": floor.get((probe, method), {}).get("preservation"),
                        "noise_floor_jaccard": floor.get((probe, method), {}).get("jaccard"),
                        "effect_spearman": effect_spearman(base_effects, model_effects),
                        "base_circuit_faithfulness": own[key]["base_circuit_faithfulness"],
                        "circuit_vulnerability": None
                        if vulnerability is None
                        else circuit_vulnerability(vulnerability),
                    }
                )
    nullable = dict.fromkeys(
        (*NOISE_FLOOR_COLUMNS, "forgetting_bench", "preservation", "circuit_vulnerability"), pl.Float64
    )
    table = pl.DataFrame(rows, schema_overrides=nullable)
    return table.with_columns(
        # Within the noise floor: the model keeps as much of the base circuit as the base keeps of itself
        # from another half of the probe items, so it is not distinguishable from base.
        (pl.col("preservation") >= pl.col("noise_floor_preservation")).alias("within_noise_floor")
    ).sort("trial", "step", "probe", "patching")


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
    keys = ["trial", "training", "init", "learning_rate", "seed", "step", "model", "patching"]
    return (
        checkpoints.group_by(keys, maintain_order=True)
        .agg(
            pl.col("target_accuracy").first(),
            pl.col("kl_to_base").first(),
            pl.col("forgetting_bench").first(),
            *[
                pl.col(c).mean()
                for c in (
                    "forgetting",
                    "forgetting_ld",
                    "preservation",
                    "base_circuit_faithfulness",
                    "circuit_vulnerability",
                    "circuit_size",
                    "faithfulness",
                    *NOISE_FLOOR_COLUMNS,
                )
            ],
        )
        .sort("trial", "step", "patching")
    )


def _item_parts(effects: pl.DataFrame, heads: Sequence[tuple[int, int]]) -> ItemParts:
    lookup = {(la, h): d for la, h, d in effects.select("layer", "head", "item_delta").iter_rows()}
    delta = np.array([lookup[head] for head in heads], dtype=np.float64)
    return ItemParts(delta, np.asarray(effects["item_denominator"][0], dtype=np.float64))


def _runs(summary: pl.DataFrame, patching: str, training: str) -> list[pl.DataFrame]:
    rows = summary.filter((pl.col("patching") == patching) & (pl.col("training") == training))
    return [frame.sort("step") for _, frame in rows.group_by("trial", maintain_order=True)]


def matched_accuracy(summary: pl.DataFrame, patching: str) -> float | None:
    """The target accuracy both methods reach: min over methods of the best step-mean accuracy."""
    best = []
    for training in TRAINING_METHODS:
        rows = summary.filter((pl.col("patching") == patching) & (pl.col("training") == training))
        if rows.is_empty():
            return None
        best.append(rows.group_by("step").agg(pl.col("target_accuracy").mean())["target_accuracy"].max())
    return float(min(best))


def common_steps(summary: pl.DataFrame, patching: str) -> list[int]:
    """Steps after 0 evaluated by both methods."""
    steps = [
        set(summary.filter((pl.col("patching") == patching) & (pl.col("training") == t))["step"].to_list())
        for t in TRAINING_METHODS
    ]
    return sorted(s for s in steps[0] & steps[1] if s > 0)


def dcv_heads_table(
    cfg: ExperimentConfig, effects: pl.DataFrame, circuits: pl.DataFrame, summary: pl.DataFrame
) -> pl.DataFrame:
    reference = base_circuits(circuits)
    by_model = {key: frame for key, frame in effects.group_by("model", "probe", "method")}
    weakened = cfg.circuits.mask.weakened_delta
    frames = []
    for (probe, method), heads in sorted(reference.items()):
        if not heads:
            continue
        base = _item_parts(by_model[(BASE_MODEL, probe, method)], heads)

        def runs(training: str, probe=probe, method=method, heads=heads) -> list[list[Checkpoint]]:
            return [
                [
                    Checkpoint(step, accuracy, _item_parts(by_model[(model, probe, method)], heads))
                    for step, accuracy, model in run.select("step", "target_accuracy", "model").iter_rows()
                ]
                for run in _runs(summary, method, training)
            ]

        sft, rl = runs("sft"), runs("rl")
        if not sft or not rl:
            continue
        level = matched_accuracy(summary, method)
        for by, values in (("step", common_steps(summary, method)), ("accuracy", [level])):
            try:
                table = dcv_table(
                    base, heads, sft, rl, by, values, cfg.circuits.n_bootstrap, cfg.circuits.ci_level
                )
            except ValueError:
                continue  # no such point reached by both methods
            base_effect = by_model[(BASE_MODEL, probe, method)].select("layer", "head", "effect")
            # DCV_h |e_h(base)| = e_h(RL) - e_h(SFT): for masks the seed paper's m_h(RL) - m_h(SFT).
            gap = (pl.col("dcv") * pl.col("base_effect").abs()).alias("effect_gap")
            table = table.join(
                base_effect.rename({"effect": "base_effect"}), on=["layer", "head"]
            ).with_columns(pl.lit(probe).alias("probe"), pl.lit(method).alias("patching"), gap)
            frames.append(table.with_columns((pl.col("effect_gap") > weakened).alias("sft_weakened")))
    if not frames:
        return pl.DataFrame()
    return pl.concat(frames).select("probe", "patching", pl.exclude("probe", "patching"))


def _spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    rx, ry = pl.Series(x).rank("average").to_numpy(), pl.Series(y).rank("average").to_numpy()
    return float(np.corrcoef(rx, ry)[0, 1])


def correlation_table(checkpoints: pl.DataFrame, summary: pl.DataFrame) -> pl.DataFrame:
    """Spearman of V(M) with forgetting over fine-tuned checkpoints (step > 0)."""
    tuned_probes = checkpoints.filter(pl.col("step") > 0)
    tuned_mean = summary.filter(pl.col("step") > 0).with_columns(pl.lit("mean").alias("probe"))
    rows = []
    for frame in (tuned_probes, tuned_mean):
        for (probe, patching), group in frame.group_by("probe", "patching", maintain_order=True):
            for training in (*TRAINING_METHODS, "pooled"):
                rows_of = group if training == "pooled" else group.filter(pl.col("training") == training)
                v = rows_of["circuit_vulnerability"].to_numpy()
                rows.append(
                    {
                        "probe": probe,
                        "patching": patching,
                        "training": training,
                        "n_checkpoints": rows_of.height,
                        "spearman_forgetting": _spearman(v, rows_of["forgetting"].to_numpy()),
                        "spearman_forgetting_ld": _spearman(v, rows_of["forgetting_ld"].to_numpy()),
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


def _at(run: pl.DataFrame, by: str, value: float, metrics: Sequence[str]) -> dict[str, float] | None:
    """A run's ``metrics`` interpolated where it first reaches ``value`` of ``by``."""
    column = "target_accuracy" if by == "accuracy" else "step"
    weights = interpolation_weights([float(x) for x in run[column].to_list()], value)
    if weights is None:
        return None
    return {m: sum(w * float(run[m][j]) for j, w in weights) for m in metrics}


def headline_table(summary: pl.DataFrame, n_bootstrap: int, ci_level: float, seed: int = 0) -> pl.DataFrame:
    """SFT, RL and SFT - RL at matched target accuracy and at the last matched step, with CIs over runs."""
    rng = np.random.default_rng(seed)
    alpha = (1 - ci_level) / 2
    rows = []
    for patching in summary["patching"].unique().sort().to_list():
        # Metrics a method has everywhere (no benchmarks configured, or no base circuit: left out).
        of_method = summary.filter(pl.col("patching") == patching)
        metrics = [m for m in HEADLINE_METRICS if of_method[m].null_count() == 0]
        points = []
        level = matched_accuracy(summary, patching)
        if level is not None:
            points.append(("accuracy", level))
        steps = common_steps(summary, patching)
        if steps:
            points.append(("step", float(steps[-1])))
        for by, value in points:
            values = {}
            for training in TRAINING_METHODS:
                at = [_at(run, by, value, metrics) for run in _runs(summary, patching, training)]
                values[training] = [a for a in at if a is not None]
            if not values["sft"] or not values["rl"]:
                continue
            for metric in metrics:
                sft = np.array([a[metric] for a in values["sft"]])
                rl = np.array([a[metric] for a in values["rl"]])
                boot_sft = sft[rng.integers(0, len(sft), (n_bootstrap, len(sft)))].mean(axis=1)
                boot_rl = rl[rng.integers(0, len(rl), (n_bootstrap, len(rl)))].mean(axis=1)
                for training, point, boot, n in (
                    ("sft", sft.mean(), boot_sft, len(sft)),
                    ("rl", rl.mean(), boot_rl, len(rl)),
                    ("sft-rl", sft.mean() - rl.mean(), boot_sft - boot_rl, min(len(sft), len(rl))),
                ):
                    rows.append(
                        {
                            "patching": patching,
                            "matched_by": by,
                            "matched_at": value,
                            "metric": metric,
                            "training": training,
                            "mean": float(point),
                            "ci_low": float(np.quantile(boot, alpha)),
                            "ci_high": float(np.quantile(boot, 1 - alpha)),
                            "n_runs": n,
                        }
                    )
    schema = {
        "patching": pl.String,
        "matched_by": pl.String,
        "matched_at": pl.Float64,
        "metric": pl.String,
        "training": pl.String,
        "mean": pl.Float64,
        "ci_low": pl.Float64,
        "ci_high": pl.Float64,
        "n_runs": pl.Int64,
    }
    return pl.DataFrame(rows, schema=schema)


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
    }
    return pl.DataFrame(rows, schema=schema)


def analyze(
    cfg: ExperimentConfig,
    results: pl.DataFrame,
    effects: pl.DataFrame,
    circuits: pl.DataFrame,
    noise_floor: pl.DataFrame | None = None,
) -> dict[str, pl.DataFrame]:
    """Every analysis table (TABLES) from the stored results, effects, circuits and noise-floor tables."""
    from dcv.circuits.noise_floor import NOISE_FLOOR_SCHEMA

    heads = effects.filter(pl.col("model") == BASE_MODEL)
    shape = (int(heads["layer"].max()) + 1, int(heads["head"].max()) + 1)
    checkpoints = checkpoint_table(cfg, results, effects, circuits, noise_floor)
    summary = summary_table(checkpoints)
    c = cfg.circuits
    return {
        "base_circuits": base_circuit_table(circuits, shape),
        "checkpoints": checkpoints,
        "summary": summary,
        "dcv_heads": dcv_heads_table(cfg, effects, circuits, summary),
        "correlations": correlation_table(checkpoints, summary),
        "headline": headline_table(summary, c.n_bootstrap, c.ci_level),
        "noise_floor": pl.DataFrame(schema=NOISE_FLOOR_SCHEMA) if noise_floor is None else noise_floor,
        "after_sft": after_sft_table(summary),
        "benchmarks": benchmark_table(results),
        "paper": paper_table(summary),
    }


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
