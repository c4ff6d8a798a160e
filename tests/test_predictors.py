"""What predicts forgetting: a synthetic experiment where forgetting = 2 KL + noise; Simpson's paradox
(within-method fits against the pooled one and the method effect); leave-one-run-out R^2 on a table worked
by hand; the uniform-shrink model that makes V and forgetting one number on the same items; the analysis
and report with a weight-change table."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from dcv.analysis import analyze
from dcv.analysis.predictors import predictor_paragraphs, predictor_rows
from dcv.circuits.weight_change import WEIGHT_CHANGE_SCHEMA
from dcv.config import PREDICTOR_NAMES, ConfigError, parse_config
from dcv.matched import Layout, Point, ProbeParts, ProbeReference, Run, checkpoint_numbers, resample
from dcv.metrics import PREDICTORS
from dcv.predictors import (
    FIXED_EFFECT,
    GROUPS,
    fit,
    loro_r2,
    predictor_table,
    weight_function_table,
)
from dcv.report import build_report, pareto_front
from dcv.results import build_results_table
from dcv.tables import CIRCUITS_SCHEMA, EFFECTS_SCHEMA
from tests.helpers import tiny_config_dict

FIXED = ("forgetting_bench", "base_circuit_faithfulness", "weight_change")


def synthetic_runs(n_runs: int = 4, seed: int = 0) -> list[Run]:
    """Runs of both methods, 3 fine-tuned checkpoints each: forgetting = 2 KL + noise (sd 0.05), weight
    change unrelated noise. No probes: the forgetting numbers stand in as fixed entries of the vector."""
    rng = np.random.default_rng(seed)
    runs = []
    for method, scale in (("sft", 1.0), ("rl", 0.3)):
        for i in range(n_runs):
            points = [Point(0, 0.0, 0.2, None, {}, {}, fixed={"forgetting": 0.0, "forgetting_ld": 0.0})]
            for step in (2, 4, 6):
                kl = scale * step / 6 * rng.uniform(0.5, 1.5)
                forgetting = 2 * kl + rng.normal(0, 0.05)
                fixed = {
                    "forgetting": forgetting,
                    "forgetting_ld": 3 * forgetting,
                    "weight_change": rng.uniform(),
                }
                points.append(Point(step, kl, 0.2 + 0.05 * step, None, {}, {}, fixed=fixed))
            runs.append(Run(f"{method}-{i}", method, tuple(points)))
    return runs


def table_of(runs, refs=(), names=None, n_draws=400, item_split=True) -> pl.DataFrame:
    layout = Layout.build(refs, FIXED)
    observed = {r.name: np.stack([checkpoint_numbers(p, refs, layout) for p in r.points]) for r in runs}
    draws = resample(runs, refs, layout, n_draws)
    return predictor_table(
        "exact", runs, observed, layout, draws, names, 0.95, refs=refs, item_split=item_split
    )


def fitted(names=None) -> pl.DataFrame:
    return table_of(synthetic_runs(), names=names)


def row_of(table: pl.DataFrame, predictor: str, training: str, forgetting: str = "forgetting") -> dict:
    rows = table.filter(
        (pl.col("predictor") == predictor)
        & (pl.col("training") == training)
        & (pl.col("forgetting") == forgetting)
    )
    assert rows.height == 1, rows
    return rows.row(0, named=True)


def test_forgetting_twice_kl_plus_noise_gives_r2_near_1_for_kl_with_n():
    table = fitted()
    print(
        table.select(
            "forgetting", "training", "predictor", "r2", "r2_ci_low", "r2_ci_high", "n_checkpoints", "n_runs"
        )
    )
    kl = table.filter((pl.col("predictor") == "kl_to_base") & (pl.col("training") == "pooled"))
    for row in kl.iter_rows(named=True):
        assert row["status"] == "ok" and row["r2"] > 0.95
        assert row["r2_ci_low"] <= row["r2"] <= row["r2_ci_high"] and row["r2_ci_low"] < row["r2_ci_high"]
        assert row["spearman"] > 0.9 and row["versus_best"] == "best"
        assert (row["n_checkpoints"], row["n_runs"]) == (24, 8) and row["n_resamples"] > 350
    per_method = table.filter((pl.col("predictor") == "kl_to_base") & (pl.col("training") == "sft"))
    assert per_method["n_checkpoints"].to_list() == [12, 12] and per_method["n_runs"].to_list() == [4, 4]
    noise = table.filter((pl.col("predictor") == "weight_change") & (pl.col("training") == "pooled"))
    assert (noise["r2"] < 0.3).all() and set(noise["versus_best"]) == {"below best"}
    # No probes here: V, P and J have no value and are left out unless asked for; steps is the baseline.
    assert set(table["predictor"]) == {"kl_to_base", "weight_change", "steps"}
    assert table["training"].unique(maintain_order=True).to_list() == list(GROUPS)  # within-method first
    assert set(table["forgetting"]) == {"forgetting", "forgetting_ld"}  # no benchmarks


def test_a_predictor_asked_for_without_a_value_is_said_not_measured():
    table = fitted(["kl_to_base", "circuit_vulnerability"])
    rows = table.filter(pl.col("predictor") == "circuit_vulnerability")
    assert set(rows["status"]) == {"not measured"} and rows["r2"].null_count() == rows.height
    assert set(rows["note"]) == {PREDICTORS["circuit_vulnerability"].needs}
    text = " ".join(predictor_paragraphs(table, "exact"))
    assert "n = 24 fine-tuned checkpoints of 8 runs" in text
    assert "RL's Razor" in text and "Not measured here: V (relative)" in text and "CMAP" in text


def fixed_runs(values: dict[str, list[list[tuple[float, float]]]], kl=None) -> list[Run]:
    """Runs whose fine-tuned checkpoints (steps 2, 4, 6) have the given (weight change, forgetting); ``kl``:
    per method, a function of (run, checkpoint) giving KL (default 0.1 step)."""
    runs = []
    for method, per_run in values.items():
        for i, pairs in enumerate(per_run):
            points = [Point(0, 0.0, 0.2, None, {}, {}, fixed={"forgetting": 0.0, "forgetting_ld": 0.0})]
            for j, (x, y) in enumerate(pairs):
                step = 2 * (j + 1)
                fixed = {"forgetting": y, "forgetting_ld": y, "weight_change": x}
                k = 0.1 * step if kl is None else kl[method](i, j)
                points.append(Point(step, k, 0.5, None, {}, {}, fixed=fixed))
            runs.append(Run(f"{method}-{i}", method, tuple(points)))
    return runs


def test_simpsons_paradox_within_method_against_pooled_and_the_method_effect():
    """Within each method forgetting falls with x (slope -0.2); pooled it rises, because SFT has both more
    x and more forgetting. The method-effect fit recovers the within slope; KL, which only separates the
    methods, has a high pooled R^2, none within, and adds nothing to the method alone."""
    rng = np.random.default_rng(0)
    values = {}
    for method, x0, y0 in (("sft", 5.0, 2.0), ("rl", 1.0, 0.5)):
        values[method] = [
            [
                (x := x0 + (j + 1) / 1.5 + 0.1 * i, y0 - 0.2 * (x - x0 - 1) + rng.normal(0, 0.01))
                for j in range(3)
            ]
            for i in range(3)
        ]
    kl = {
        "sft": lambda i, j: 1.0 + 0.01 * ((i + 2 * j) % 3),
        "rl": lambda i, j: 0.1 + 0.01 * ((2 * i + j) % 3),
    }
    table = table_of(fixed_runs(values, kl), n_draws=200)
    for training in ("sft", "rl"):
        within = row_of(table, "weight_change", training)
        assert within["slope"] < 0 and within["r2"] > 0.9
    pooled = row_of(table, "weight_change", "pooled")
    assert pooled["slope"] > 0  # the paradox: the pooled line rises
    effect = row_of(table, "weight_change", FIXED_EFFECT)
    assert effect["slope"] == pytest.approx(-0.2, abs=0.02)
    assert effect["r2"] > 0.99 > pooled["r2"] and effect["r2"] > effect["r2_method_only"] > 0.8
    assert effect["spearman"] < -0.9  # of the method-demeaned values
    # KL only separates the methods: pooled it explains most, within a method nearly nothing.
    kl_pooled, kl_effect = row_of(table, "kl_to_base", "pooled"), row_of(table, "kl_to_base", FIXED_EFFECT)
    assert kl_pooled["r2"] > 0.8
    assert all(row_of(table, "kl_to_base", t)["r2"] < 0.3 for t in ("sft", "rl"))
    assert kl_effect["r2"] - kl_effect["r2_method_only"] < 0.05
    assert kl_effect["versus_best"] == "below best"  # 3 runs of each method: a verdict is given
    text = " ".join(predictor_paragraphs(table, "exact"))
    assert text.index("Within SFT") < text.index("Within RL") < text.index("Pooled with a method effect")
    assert "The method alone gives R²" in text and "steps-only baseline" in text


def test_leave_one_run_out_r2_on_a_table_worked_by_hand():
    """Run A: (0, 0), (1, 1), (2, 2); run B: y = x + 1. Within a method, leaving A out fits y = x + 1 on B
    and misses A by 1 at each point (SSE 3), and the other way round: SSE 6 against SST 5.5, LORO R^2 =
    -1/11, against the in-sample 8/11. Pooled over two such methods (4 runs), a left-out run is fitted by
    intercept 2/3 or 1/3: SSE 4 (4/3) = 16/3 against SST 11, 17/33; with the method effect the remaining run
    of its method sets the intercept: SSE 12, -1/11."""
    a, b = [(0.0, 0.0), (1.0, 1.0), (2.0, 2.0)], [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)]
    table = table_of(fixed_runs({"sft": [a, b], "rl": [a, b]}), n_draws=50)
    sft = row_of(table, "weight_change", "sft")
    assert sft["r2"] == pytest.approx(8 / 11) and sft["r2_loro"] == pytest.approx(-1 / 11)
    assert row_of(table, "weight_change", "pooled")["r2_loro"] == pytest.approx(17 / 33)
    assert row_of(table, "weight_change", FIXED_EFFECT)["r2_loro"] == pytest.approx(-1 / 11)
    x, y = np.array([0, 1, 2, 0, 1, 2.0]), np.array([0, 1, 2, 1, 2, 3.0])
    assert loro_r2(x, y, np.array([0, 0, 0, 1, 1, 1])) == pytest.approx(-1 / 11)
    assert np.isnan(loro_r2(x, y, np.zeros(6, np.int64)))  # one run: nothing to leave out
    # Two runs of a method: the run bootstrap under-covers, so no versus_best verdict is given.
    steps = row_of(table, "steps", "sft")  # steps and weight change tie here: steps is not the best
    assert steps["versus_best"] == "not distinguishable at this power (2 runs)"
    assert row_of(table, "steps", "pooled")["versus_best"].endswith("(2 runs of sft)")


N_ITEMS = 40
SHRINK_HEADS = np.array([1.0, 0.6, 0.05])[:, None]  # per-head share of the item's base delta


def shrink_runs(seed: int = 0) -> tuple[list[Run], ProbeReference]:
    """One probe (40 items); each checkpoint scales every item's LD, delta and gap by s (1 + e_i), s per
    checkpoint, e_i item noise: on the same items V (absolute) and forgetting (mean LD) are one number up
    to scale, whatever the noise."""
    rng = np.random.default_rng(seed)
    d = 1 + 0.5 * rng.uniform(size=N_ITEMS)  # the base model's per-item size

    def parts(scale: np.ndarray) -> ProbeParts:
        return ProbeParts(SHRINK_HEADS * d * scale, d * scale, 4 * d * scale)

    base = parts(np.ones(N_ITEMS))
    ref = ProbeReference("ioi", base, np.array([0, 1]), 0.25, True, True, (1.0, float(4 * d.mean())))
    own = {"ioi": np.array([0, 1])}
    runs = []
    for method in ("sft", "rl"):
        for i in range(2):
            points = [Point(0, 0.0, 0.2, None, {"ioi": base}, own)]
            for step in (2, 4, 6):
                s = rng.uniform(0.5, 0.95)
                scale = s * np.clip(1 + rng.normal(0, 0.3, N_ITEMS), 0.1, None)
                points.append(Point(step, 1 - s + rng.normal(0, 0.05), 0.5, None, {"ioi": parts(scale)}, own))
            runs.append(Run(f"{method}-{i}", method, tuple(points)))
    return runs, ref


def test_uniform_shrink_v_against_forgetting_only_on_disjoint_items():
    runs, ref = shrink_runs()
    layout = Layout.build([ref], FIXED)
    tuned = np.stack([checkpoint_numbers(p, [ref], layout) for r in runs for p in r.points if p.step > 0])
    same = fit(layout.scalar(tuned, "circuit_vulnerability_abs"), layout.scalar(tuned, "forgetting_ld"))
    assert same.r2 == pytest.approx(1.0, abs=1e-9)  # the trap: on the same items R^2 = 1 by construction
    split = table_of(runs, [ref], n_draws=50)
    row = row_of(split, "circuit_vulnerability_abs", "pooled", "forgetting_ld")
    assert row["status"] == "ok" and row["items"] == "split"
    assert 0.2 < row["r2"] < 0.95 and row["r2_ci_low"] < row["r2_ci_high"] < 1  # item noise of each half
    assert row_of(split, "kl_to_base", "pooled", "forgetting_ld")["items"] == "all"
    whole = table_of(runs, [ref], n_draws=50, item_split=False)
    item_based = [n for n, p in PREDICTORS.items() if p.items]
    rows = whole.filter(pl.col("predictor").is_in(item_based) & pl.col("forgetting").is_in(["forgetting_ld"]))
    measured = rows.filter(pl.col("status") != "not measured")
    assert measured.height > 0 and set(measured["status"]) == {"same items"}
    assert measured["r2"].null_count() == measured.height and set(measured["versus_best"]) == {None}
    assert "predictor_item_split is off" in measured["note"][0]
    best = whole.filter((pl.col("forgetting") == "forgetting_ld") & (pl.col("versus_best") == "best"))
    assert set(best["predictor"]) <= {"kl_to_base", "steps"}
    text = " ".join(predictor_paragraphs(whole, "exact"))
    assert "Not reported (same items): " in text and "V (absolute)" in text
    shown = predictor_rows(whole, "exact")
    assert "same items" in shown["status"].to_list() and shown["training"][0] == "sft"


def test_steps_baseline_is_in_every_group_even_when_not_asked_for():
    table = fitted(["kl_to_base"])
    steps = table.filter(pl.col("predictor") == "steps")
    assert steps.height == 2 * len(GROUPS) and set(steps["status"]) == {"ok"}
    assert "steps-only baseline" in " ".join(predictor_paragraphs(table, "exact"))


def test_config_names_every_predictor_once():
    assert PREDICTOR_NAMES == tuple(PREDICTORS)
    raw = tiny_config_dict("/tmp/unused")
    raw["analysis"] = {"predictors": ["kl_to_base", "kl_to_base"]}
    with pytest.raises(ConfigError, match="twice"):
        parse_config(raw)


def test_pareto_front_keeps_the_points_nothing_beats_on_both():
    x = np.array([0.1, 0.5, 0.4, 0.9, 0.9])
    y = np.array([0.9, 0.8, 0.5, 0.2, 0.1])
    assert sorted(pareto_front(x, y).tolist()) == [0, 1, 3]


def test_weight_function_spearman_per_checkpoint_and_pooled():
    from dcv.matched import ProbeParts, ProbeReference

    ref = ProbeReference(
        "ioi", ProbeParts(np.ones((4, 2)), np.ones(2)), np.array([0, 1, 2]), 0.25, True, True
    )
    layout = Layout.build([ref], FIXED)
    vector = np.zeros(layout.size)
    vector[layout.slices["ioi/v"]] = [0.1, 0.5, 0.3]
    changes = {"sft-a@4": np.array([1.0, 3.0, 2.0, 9.0])}  # ranks agree with v_h on the circuit heads
    table = weight_function_table("exact", [("sft", "sft-a", 4, "sft-a@4", vector)], [ref], layout, changes)
    one = table.filter(pl.col("trial") == "sft-a").row(0, named=True)
    assert one["spearman_v"] == pytest.approx(1.0) and one["n_heads"] == 3
    assert one["circuit_change"] == pytest.approx(2.0) and one["other_change"] == pytest.approx(9.0)
    assert table.filter(pl.col("trial") == "pooled")["step"].to_list() == [None]


HEADS = [(0, 0), (0, 1), (1, 0), (1, 1)]
BASE_EFFECTS = (1.0, 0.5, 0.1, 0.0)  # the base circuit: the first two heads
STEPS = (0, 2, 4)
KEEP = {"sft": (1.0, 0.8, 0.6), "rl": (1.0, 0.97, 0.94)}  # share of every effect and LD a step keeps
NOISE = np.array([-0.1, 0.1, -0.05, 0.05])  # per probe item
N_TEST = 20


def experiment(tmp_path) -> tuple:
    """(config, results, effects, circuits) of 2 SFT and 2 RL runs on one probe (ioi, 4 items)."""
    raw = tiny_config_dict(tmp_path)
    raw["probes"] = [{"name": "ioi", "n_items": 4}]
    raw["patching"]["methods"] = ["exact"]
    raw["circuits"].update(n_bootstrap=100)
    results, models = [], {"base": ("base", 0, 1.0)}
    for method in ("sft", "rl"):
        for seed in (0, 1):
            trial = f"{method}-seed{seed}"
            for i, step in enumerate(STEPS):
                keep = KEEP[method][i] - 0.02 * seed * (step > 0)
                lds = 4 * keep * (1 + NOISE)
                right = round(N_TEST * (0.25 + step * (0.05 if method == "sft" else 0.025)))
                metrics = {
                    "target/accuracy": right / N_TEST,
                    "probe/ioi/accuracy": float((lds > 0).mean()),
                    "probe/ioi/mean_ld": float(lds.mean()),
                    "kl_to_base": 1.0 - keep,
                }
                key = {"trial": trial, "method": method, "learning_rate": 1e-5, "seed": seed, "init": "base"}
                results.append({**key, "step": step, "checkpoint": "x", "metrics": metrics, "lds": lds})
                results[-1]["correct"] = [1.0] * right + [0.0] * (N_TEST - right)
                if step:
                    models[f"{trial}@{step}"] = (trial, step, keep)
    table = build_results_table(
        [{k: v for k, v in r.items() if k not in ("lds", "correct")} for r in results]
    )
    order = sorted(results, key=lambda r: (r["trial"], r["step"]))
    table = table.with_columns(
        pl.Series("target/item_correct", [r["correct"] for r in order], dtype=pl.List(pl.Float64)),
        pl.Series("probe/ioi/item_ld", [r["lds"].tolist() for r in order], dtype=pl.List(pl.Float64)),
    )
    effects, circuits = [], []
    for model, (trial, step, keep) in models.items():
        where = {"model": model, "probe": "ioi", "trial": trial, "step": step}
        for (layer, head), effect in zip(HEADS, BASE_EFFECTS, strict=True):
            effects.append(
                {
                    **where,
                    **{
                        "method": "exact",
                        "layer": layer,
                        "head": head,
                        "effect": effect * keep,
                        "n_items": 4,
                    },
                    "checkpoint": "x",
                    "item_delta": (effect * keep * (1 + NOISE)).tolist(),
                    "item_denominator": [1.0] * 4,
                }
            )
        circuit = {"size": 2, "faithfulness": 0.9, "reached_tau": True, "base_circuit_faithfulness": 0.9}
        circuits.append({**where, "method": "exact", **circuit, "layers": [0, 0], "heads": [0, 1]})
    effects = pl.DataFrame(effects, schema=EFFECTS_SCHEMA)
    return parse_config(raw), table, effects, pl.DataFrame(circuits, schema=CIRCUITS_SCHEMA)


def weight_change_table() -> pl.DataFrame:
    """Every checkpoint of tests/test_analysis' runs: SFT moves each head 10x as far as RL, more by step."""
    rows = []
    for method, per_step in (("sft", 0.01), ("rl", 0.001)):
        for seed in (0, 1):
            for step in STEPS[1:]:
                for layer, head in HEADS:
                    change = per_step * step * (1 + head)
                    rows.append(
                        {
                            "model": f"{method}-seed{seed}@{step}",
                            "trial": f"{method}-seed{seed}",
                            "method": method,
                            "seed": seed,
                            "step": step,
                            "layer": layer,
                            "head": head,
                            "kv_shared_by": 2,
                            "n_params": 100,
                            "dtype": "float32",
                            "q_change": change,
                            "k_change": 0.0,
                            "v_change": 0.0,
                            "o_change": 0.0,
                            "change": change,
                            "changed_share": 1.0,
                        }
                    )
    return pl.DataFrame(rows, schema=WEIGHT_CHANGE_SCHEMA)


def test_analysis_and_report_with_weight_change(tmp_path):
    cfg, results, effects, circuits = experiment(tmp_path)
    tables = analyze(cfg, results, effects, circuits, None, weight_change_table())
    summary = tables["summary"]
    sft4 = summary.filter((pl.col("trial") == "sft-seed0") & (pl.col("step") == 4)).row(0, named=True)
    assert sft4["weight_change"] == pytest.approx(0.01 * 4 * 1.5)  # mean over heads of 0.04 (1 + head)
    assert summary.filter(pl.col("step") == 0)["weight_change"].to_list() == [0.0] * 4
    predictors = tables["predictors"]
    assert {"kl_to_base", "weight_change", "circuit_vulnerability", "one_minus_preservation"} <= set(
        predictors["predictor"]
    )
    pooled = predictors.filter((pl.col("training") == "pooled") & (pl.col("status") == "ok"))
    assert (pooled["n_checkpoints"] == 8).all() and (pooled["n_runs"] == 4).all()
    heads = tables["weight_change_heads"]
    assert heads.filter((pl.col("training") == "sft") & (pl.col("step") == 4))["n_runs"].to_list() == [2] * 4
    assert not tables["weight_vs_function"].is_empty()
    md, _, figures = build_report(tables, tmp_path / "report", "t", ["about"], {})
    names = {p.name for p in figures}
    assert {"weight_change.png", "predictors.png", "predictors_r2.png", "razor_pareto.png"} <= names
    text = md.read_text()
    assert "## What predicts forgetting" in text and "Weight change against function change" in text


def cmap_effects(effects: pl.DataFrame) -> pl.DataFrame:
    """A CMAP table for the experiment's checkpoints: cmap_h = (1 - keep) (1 + head + 2 layer), both
    directions (keep = the checkpoint's effect over the base's on head (0, 0), whose base effect is 1)."""
    from dcv.config import CMAP_DIRECTIONS
    from dcv.tables import CMAP_SCHEMA

    tuned = effects.filter(pl.col("model") != "base")
    keep = tuned.filter((pl.col("layer") == 0) & (pl.col("head") == 0)).select("model", keep="effect")
    change = (1 - pl.col("keep")) * (1 + pl.col("head") + 2 * pl.col("layer"))
    frames = [
        tuned.join(keep, on="model")
        .with_columns(
            method=pl.lit("cmap"),
            effect=change,
            item_delta=pl.concat_list([change * (1 + float(n)) for n in NOISE]),
            item_denominator=pl.lit([1.0] * 4, pl.List(pl.Float64)),
            direction=pl.lit(direction),
        )
        .select(list(CMAP_SCHEMA))
        for direction in CMAP_DIRECTIONS
    ]
    return pl.concat(frames)


def test_analysis_with_cmap_gives_the_cmap_table_and_predictor(tmp_path):
    cfg, results, effects, circuits = experiment(tmp_path)
    cfg = cfg.model_copy(update={"patching": cfg.patching.model_copy(update={"methods": ["exact", "cmap"]})})
    cmap = cmap_effects(effects)
    tables = analyze(cfg, results, effects, circuits, None, None, cmap)
    assert set(tables["predictors"]["patching"]) == {"exact"}  # cmap is no circuit method
    table = tables["cmap"]
    assert table.height == 8 * 2 and set(table["direction"]) == {"ckpt_into_base", "base_into_ckpt"}
    sft4 = table.filter((pl.col("model") == "sft-seed0@4") & (pl.col("direction") == "ckpt_into_base"))
    row = sft4.row(0, named=True)
    # keep 0.6: |cmap| = 0.4 (1, 2, 3, 4); base circuit (0, 0), (0, 1): mean 0.6; all four heads: 1.0
    assert row["mean_abs_cmap_circuit"] == pytest.approx(0.6)
    assert row["mean_abs_cmap_all"] == pytest.approx(1.0)
    assert (row["n_circuit_heads"], row["n_heads"], row["n_items"], row["training"]) == (2, 4, 4, "sft")
    assert row["circuit_ci_low"] < 0.6 < row["circuit_ci_high"]
    predictor = tables["predictors"].filter(
        (pl.col("predictor") == "cmap")
        & (pl.col("training") == "pooled")
        & (pl.col("forgetting") == "forgetting_ld")
    )
    # CMAP is patched on the probe items that measure forgetting and is stored over all of them: not a
    # predictor of item-based forgetting (no split of it), so the row says so and has no R^2.
    assert predictor["status"].to_list() == ["same items"] and predictor["n_checkpoints"].to_list() == [8]
    assert predictor["r2"].to_list() == [None] and "all items" in predictor["note"][0]
    # Each checkpoint's predictor value is in the summary (the report's scatter reads it there; a real
    # run's report failed on its absence): the mean |cmap| over the base circuit, 0 for the base.
    summary = tables["summary"]
    assert summary.filter(pl.col("model") == "sft-seed0@4")["cmap"].to_list() == [pytest.approx(0.6)]
    assert summary.filter(pl.col("step") == 0)["cmap"].to_list() == [0.0] * 4
    md, _, figures = build_report(tables, tmp_path / "report", "t", ["about"], {})
    assert "predictors.png" in {p.name for p in figures}
    assert "Cross-model activation patching (cmap)" in md.read_text()


def test_a_config_may_not_start_with_cmap(tmp_path):
    raw = tiny_config_dict(tmp_path)
    raw["patching"]["methods"] = ["cmap", "exact"]
    with pytest.raises(ConfigError, match="starts with cmap"):
        parse_config(raw)
