"""The analysis and the report on hand-built tables whose answers are known in closed form."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from dcv.analysis import analyze, read_analysis, write_analysis
from dcv.analysis.answer import answer_table
from dcv.config import parse_config
from dcv.report import build_report
from dcv.results import build_results_table
from dcv.tables import CIRCUITS_SCHEMA, EFFECTS_SCHEMA
from tests.helpers import (
    BASE_CIRCUIT,
    N_ITEMS,
    N_TEST,
    STEPS,
    analysis_config_dict,
    circuits_table,
    correct,
    effect_rows,
    effects_table,
    results_table,
)


def config(tmp_path: Path):
    return parse_config(analysis_config_dict(tmp_path))


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> dict[str, pl.DataFrame]:
    cfg = config(tmp_path_factory.mktemp("analysis"))
    return analyze(cfg, results_table(), effects_table(), circuits_table())


def test_per_checkpoint_metrics(tables):
    rows = tables["checkpoints"]
    assert rows.height == 4 * len(STEPS)  # step 0 of every trial is the base model
    sft4 = rows.filter((pl.col("trial") == "sft-seed0") & (pl.col("step") == 4)).row(0, named=True)
    # Every circuit head keeps 60% of its base effect: v_h = 0.4 for each, so V = 0.4.
    assert sft4["circuit_vulnerability"] == pytest.approx(0.4)
    assert sft4["preservation"] == pytest.approx(0.5)
    # Clean LDs 2.64, 2.28, 2.52, 2.16 with the first item now wrong (-1): mean 1.49, accuracy 0.75.
    assert sft4["forgetting_ld"] == pytest.approx(4.0 - 1.49)
    assert sft4["forgetting"] == pytest.approx(0.25)
    assert sft4["jaccard"] == pytest.approx(1 / 3)
    assert sft4["forgetting_bench"] == pytest.approx(0.5 - 0.5 * 0.6)
    base = rows.filter(pl.col("step") == 0)
    assert (base["circuit_vulnerability"].abs() < 1e-12).all() and (base["preservation"] == 1.0).all()


def headline_row(headline: pl.DataFrame, by: str, at: float, metric: str, training: str) -> dict:
    rows = headline.filter(
        (pl.col("matched_by") == by)
        & ((pl.col("matched_at") - at).abs() < 1e-9)
        & (pl.col("metric") == metric)
        & (pl.col("training") == training)
    )
    assert rows.height == 1, f"{by}={at} {metric} {training}: {rows.height} rows"
    return rows.row(0, named=True)


def test_headline_at_matched_accuracy(tables):
    headline = tables["headline"]
    # Both methods reach 0.45 (RL's best): SFT 0.8 of the way from step 0 (0.25) to step 2 (0.5), so
    # V = 0.8 * 0.2 = 0.16; RL exactly at step 4, V = 0.05.
    diff = headline_row(headline, "accuracy", 0.45, "circuit_vulnerability", "sft-rl")
    assert diff["status"] == "ok" and diff["mean"] == pytest.approx(0.16 - 0.05)
    assert diff["n_runs_sft"] == 2 and diff["n_runs_rl"] == 2
    assert diff["n_probe_items"] == N_ITEMS and diff["n_target_items"] == N_TEST
    assert diff["probe_items"] == ", ".join(f"{p} {N_ITEMS}" for p in ("ioi",))
    # Probe items and target items are resampled (these runs): a real interval around the point; across
    # seeds a Welch interval, wider, and an MDE beside it.
    assert diff["ci_low"] < diff["mean"] < diff["ci_high"] and diff["mde"] > 0
    assert diff["seed_ci_low"] < diff["mean"] < diff["seed_ci_high"] and diff["seed_df"] > 0
    assert headline_row(headline, "accuracy", 0.45, "forgetting_bench", "sft")["mean"] == pytest.approx(
        0.8 * (0.5 - 0.5 * 0.8 * (1 - 0.01))
    )
    # The level is the matching variable: its own number is not a comparison.
    assert headline.filter(
        (pl.col("matched_by") == "accuracy") & (pl.col("metric") == "target_accuracy")
    ).is_empty()
    # Every CI of a used level has width (a zero-width CI is a bug, not a result); numbers equal in every
    # draw (or in 95% of them) are said to be so: no run lost a probe, faithfulness 0.9 everywhere here,
    # below step 4 every circuit head is kept in nearly every draw, and KL and benchmarks are not
    # item-resampled (with the runs held fixed they are fixed numbers).
    ok = headline.filter(pl.col("status") == "ok")
    assert (ok["ci_high"] > ok["ci_low"]).all(), ok.filter(pl.col("ci_high") <= pl.col("ci_low"))
    constant = headline.filter(pl.col("status") == "no variation")
    assert set(constant["metric"]) <= {
        "n_lost",
        "base_circuit_faithfulness",
        "forgetting",
        "preservation",
        "jaccard",
        "kl_to_base",
        "forgetting_bench",
    }
    assert (constant["ci_low"] == constant["ci_high"]).all()


def test_levels_that_one_method_never_reaches_carry_no_numbers(tables):
    accuracy = tables["headline"].filter(pl.col("matched_by") == "accuracy")
    used = sorted(accuracy.filter(pl.col("status") == "ok")["matched_at"].unique().to_list())
    assert used == pytest.approx([0.3, 0.35, 0.4, 0.45])  # multiples of 0.05 above the base's 0.25
    short = accuracy.filter(pl.col("status") == "insufficient runs")
    assert sorted(short["matched_at"].to_list()) == pytest.approx([0.5, 0.55, 0.6, 0.65, 0.7, 0.75])
    assert (
        (short["n_runs_rl"] == 0).all() and (short["n_runs_sft"] == 2).all() and short["mean"].is_null().all()
    )


def test_headline_at_matched_step(tables):
    at4 = headline_row(tables["headline"], "step", 4.0, "circuit_vulnerability", "sft-rl")
    assert at4["mean"] == pytest.approx(0.4 - 0.05)
    kl = headline_row(tables["headline"], "step", 4.0, "kl_to_base", "sft")
    # KL is not item-resampled: with these runs held fixed it is one number (the runs' 0.4 and 0.48).
    assert kl["mean"] == pytest.approx(0.4 * 1.1) and kl["status"] == "no variation"
    assert kl["ci_low"] == kl["ci_high"] == pytest.approx(0.44)
    # Across seeds the two runs' spread is the difference's: Welch's df from the runs' variances.
    kl_diff = headline_row(tables["headline"], "step", 4.0, "kl_to_base", "sft-rl")
    assert kl_diff["seed_se"] > 0 and kl_diff["seed_ci_low"] < kl_diff["mean"] < kl_diff["seed_ci_high"]


def test_one_run_of_a_method_at_every_level_gives_no_verdict(tmp_path):
    cfg = config(tmp_path)
    results = results_table().filter(pl.col("trial") != "rl-seed1")
    effects = effects_table().filter(pl.col("trial") != "rl-seed1")
    circuits = circuits_table().filter(pl.col("trial") != "rl-seed1")
    tables = analyze(cfg, results, effects, circuits)
    headline = tables["headline"]
    assert (headline["status"] == "insufficient runs").all() and (headline["n_runs_rl"] <= 1).all()
    assert headline["mean"].is_null().all() and tables["dcv_heads"].is_empty()
    md, _, _ = build_report(tables, tmp_path / "report", "t", ["about"], {})
    first = md.read_text().split("## ")[1]
    assert (
        "insufficient runs" in first.lower()
        and "CI excludes 0" not in first
        and "higher under SFT" not in first
    )


def test_rl_started_from_sft_is_never_matched_at_its_start(tmp_path):
    """RL after SFT: each run's step 0 is the SFT checkpoint (accuracy 0.75). Matched on accuracy, RL
    runs start above every level SFT reaches, so no level is used (old code matched RL's step 0)."""
    cfg = config(tmp_path)
    results, effects, circuits = results_table(), effects_table(), circuits_table()
    results = results.filter(pl.col("method") == "sft")
    effects = effects.filter(~pl.col("trial").str.starts_with("rl"))
    circuits = circuits.filter(~pl.col("trial").str.starts_with("rl"))
    rows, effect_rows_, circuit_rows = [], [], []
    for seed in (0, 1):
        trial = f"rl-after-sft-seed{seed}"
        for step, accuracy in ((0, 0.75), (2, 0.8), (4, 0.85)):
            rows.append(
                {
                    "trial": trial,
                    "method": "rl",
                    "learning_rate": 1e-6,
                    "seed": seed,
                    "init": f"sft:sft-seed{seed}@4",
                    "step": step,
                    "checkpoint": f"/ckpt/{trial}/{step}",
                    "metrics": {
                        "target/accuracy": accuracy,
                        "probe/ioi/accuracy": 0.8,
                        "probe/ioi/mean_ld": 2.4,
                        "kl_to_base": 0.5 + 0.1 * step,
                    },
                }
            )
            if step:
                effect_rows_ += effect_rows(f"{trial}@{step}", trial, step, 0.6)
                row = circuits.filter(pl.col("model") == f"sft-seed{seed}@4").row(0, named=True)
                circuit_rows.append({**row, "model": f"{trial}@{step}", "trial": trial, "step": step})
    extra = build_results_table(rows).with_columns(
        pl.Series("target/item_correct", [correct(r["metrics"]["target/accuracy"], 0) for r in rows]).cast(
            pl.List(pl.Float64)
        )
    )
    results = pl.concat([results, extra], how="diagonal_relaxed").sort("trial", "step")
    effects = pl.concat([effects, pl.DataFrame(effect_rows_, schema=EFFECTS_SCHEMA)])
    circuits = pl.concat([circuits, pl.DataFrame(circuit_rows, schema=CIRCUITS_SCHEMA)])
    headline = analyze(cfg, results, effects, circuits)["headline"]
    accuracy = headline.filter(pl.col("matched_by") == "accuracy")
    assert not accuracy.is_empty() and (accuracy["status"] == "insufficient runs").all()
    # Up to SFT's best (0.75) no RL run brackets a level; above it no SFT run does.
    assert (accuracy.filter(pl.col("matched_at") <= 0.75 + 1e-9)["n_runs_rl"] == 0).all()
    assert (accuracy.filter(pl.col("matched_at") > 0.75 + 1e-9)["n_runs_sft"] == 0).all()
    # Matched on steps, RL's step 2 is its own checkpoint (effects 0.6 of base: V = 0.4), never the start.
    rl2 = headline_row(headline, "step", 2.0, "circuit_vulnerability", "rl")
    assert rl2["mean"] == pytest.approx(0.4)
    # sft-seed*@4 is also each RL run's step-0 row (listed first): the SFT run still has it at step 4.
    sft4 = headline_row(headline, "step", 4.0, "circuit_vulnerability", "sft")
    assert sft4["mean"] == pytest.approx(0.4) and sft4["n_runs_sft"] == 2


def test_dcv_per_head_and_correlations(tables):
    dcv = tables["dcv_heads"].filter((pl.col("by") == "accuracy") & ((pl.col("value") - 0.45).abs() < 1e-9))
    assert sorted(zip(dcv["layer"], dcv["head"], strict=True)) == BASE_CIRCUIT
    # Every head keeps 0.84 of its base effect under SFT at 0.45 and 0.95 under RL: DCV_h = 0.16 - 0.05.
    assert dcv["dcv"].to_list() == pytest.approx([0.11, 0.11])
    assert (dcv["ci_low"] < dcv["dcv"]).all() and (dcv["ci_high"] > dcv["dcv"]).all()
    assert (dcv["n_sft"] == 2).all() and (dcv["n_rl"] == 2).all()
    pooled = tables["correlations"].filter((pl.col("probe") == "mean") & (pl.col("training") == "pooled"))
    assert pooled["n_checkpoints"][0] == 8


def test_noise_floor_beside_preservation(tables):
    floor = tables["noise_floor"].row(0, named=True)
    # The base circuit's heads (effects 1.0 and 0.5) stay on top in every resample: P = J = 1 at the floor.
    assert floor["kind"] == "bootstrap" and floor["n_resamples"] == 200 and floor["n_items"] == N_ITEMS
    assert floor["preservation"] == 1.0 and floor["jaccard"] == 1.0
    rows = tables["checkpoints"]
    assert (rows["noise_floor_preservation"] == 1.0).all()
    sft4 = rows.filter((pl.col("training") == "sft") & (pl.col("step") == 4))
    assert not sft4["within_noise_floor"].any()
    assert rows.filter(pl.col("training") == "rl")["within_noise_floor"].all()


def test_paper_comparison_table(tables):
    paper = {r["quantity"]: r for r in tables["paper"].iter_rows(named=True)}
    assert paper["circuit_size"]["base"] == 2 and paper["circuit_size"]["paper_base"] == 297
    assert paper["retention_pct"]["sft"] == pytest.approx(50.0)
    assert paper["retention_pct"]["rl"] == pytest.approx(100.0)
    assert paper["faithfulness"]["rl"] == pytest.approx(0.9) and paper["retention_pct"]["n_runs_sft"] == 2


def test_a_probe_the_base_model_cannot_do_is_left_out_and_named(tmp_path):
    """Probe greater_than with a gap around 0 (per-item gaps +-1) and accuracy 0.5: no circuit numbers,
    not in any mean, and the report says why; ioi's numbers are unchanged."""
    raw = config(tmp_path).model_dump(mode="json")
    raw["probes"].append({"name": "greater_than", "n_items": N_ITEMS})
    cfg = parse_config(raw)
    results = results_table().with_columns(
        pl.lit(0.5).alias("probe/greater_than/accuracy"), pl.lit(0.0).alias("probe/greater_than/mean_ld")
    )
    effects = effects_table()
    flat = effects.with_columns(
        pl.lit("greater_than").alias("probe"),
        pl.lit([1.0, -1.0, 1.0, -1.0], pl.List(pl.Float64)).alias("item_denominator"),
    )
    circuits = circuits_table()
    circuits = pl.concat([circuits, circuits.with_columns(pl.lit("greater_than").alias("probe"))])
    tables = analyze(cfg, results, pl.concat([effects, flat]), circuits)
    base = tables["base_circuits"].filter(pl.col("probe") == "greater_than").row(0, named=True)
    assert not base["competent"] and not base["in_means"] and base["gap_ci_low"] <= 0
    assert (
        "cannot do it" in base["excluded_because"]
        and "accuracy 0.5 < min_accuracy 0.7" in base["excluded_because"]
    )
    rows = tables["checkpoints"].filter(pl.col("probe") == "greater_than")
    assert (rows["status"] == "not competent").all() and rows["circuit_vulnerability"].is_null().all()
    sft4 = (
        tables["summary"].filter((pl.col("trial") == "sft-seed0") & (pl.col("step") == 4)).row(0, named=True)
    )
    assert sft4["circuit_vulnerability"] == pytest.approx(0.4) and sft4["n_probes_circuits"] == 1
    md, _, _ = build_report(tables, tmp_path / "report", "t", ["about"], {})
    assert "Probe greater_than is left out of the means: the base model cannot do it" in md.read_text()


def test_a_checkpoint_that_lost_a_probe_is_lost_and_counts_as_forgetting(tmp_path):
    """SFT at step 4 keeps a tenth of the base gap (below lost_fraction 0.25): no relative numbers (which
    would divide by ~0.1 and read as no damage at all), the absolute V shows the loss, n_lost counts it."""
    effects = effects_table().with_columns(
        pl.when(pl.col("model").str.starts_with("sft") & (pl.col("step") == 4))
        .then(pl.lit([0.1] * N_ITEMS, pl.List(pl.Float64)))
        .otherwise("item_denominator")
        .alias("item_denominator")
    )
    tables = analyze(config(tmp_path), results_table(), effects, circuits_table())
    row = (
        tables["checkpoints"]
        .filter((pl.col("trial") == "sft-seed0") & (pl.col("step") == 4))
        .row(0, named=True)
    )
    assert row["status"] == "lost" and row["lost"] and row["gap"] == pytest.approx(0.1)
    assert row["circuit_vulnerability"] is None and row["preservation"] is None
    assert row["circuit_vulnerability_abs"] == pytest.approx(0.4)  # effects 0.6 of base, over the base's gap
    assert row["forgetting"] == pytest.approx(0.25)
    summary = (
        tables["summary"].filter((pl.col("trial") == "sft-seed0") & (pl.col("step") == 4)).row(0, named=True)
    )
    assert summary["n_lost"] == 1 and summary["circuit_vulnerability"] is None
    lost = headline_row(tables["headline"], "step", 4.0, "n_lost", "sft")
    assert lost["mean"] == pytest.approx(1.0)


def test_rl_after_sft_against_its_start_point(tmp_path):
    """An RL run started from sft-seed0@4 that restores the lost head: compared with that checkpoint."""
    trial, start = "rl-after-sft", "sft:sft-seed0@4"
    extra = []
    for step, accuracy in ((0, 0.75), (2, 0.8)):
        extra.append(
            {
                "trial": trial,
                "method": "rl",
                "learning_rate": 1e-6,
                "seed": 0,
                "init": start,
                "step": step,
                "checkpoint": f"/ckpt/{trial}/{step}",
                "metrics": {
                    "target/accuracy": accuracy,
                    "probe/ioi/accuracy": 0.8,
                    "probe/ioi/mean_ld": 2.4 if step == 0 else 3.6,
                    "kl_to_base": 0.4,
                },
            }
        )
    results = pl.concat([results_table(), build_results_table(extra)], how="diagonal_relaxed").sort(
        "trial", "step"
    )
    effects = pl.concat(
        [effects_table(), pl.DataFrame(effect_rows(f"{trial}@2", trial, 2, 0.9), schema=EFFECTS_SCHEMA)]
    )
    circuit = circuits_table().filter(pl.col("model") == "rl-seed0@2")
    circuits = pl.concat(
        [circuits_table(), circuit.with_columns(model=pl.lit(f"{trial}@2"), trial=pl.lit(trial))]
    )
    after = analyze(config(tmp_path), results, effects, circuits)["after_sft"]
    row = after.row(0, named=True)
    assert after.height == 1 and row["trial"] == trial and row["init"] == start and row["step"] == 2
    assert row["preservation_start"] == pytest.approx(0.5) and row["preservation"] == pytest.approx(1.0)
    assert row["restores_circuit"]
    assert row["circuit_vulnerability_start"] == pytest.approx(0.4)
    assert row["circuit_vulnerability"] == pytest.approx(0.1)


def test_missing_base_row_is_an_error(tmp_path):
    results = results_table().filter(pl.col("step") > 0)
    with pytest.raises(ValueError, match="no step-0 row"):
        analyze(config(tmp_path), results, effects_table(), circuits_table())


def test_report_from_stored_tables(tables, tmp_path):
    write_analysis(tables, tmp_path)
    stored = read_analysis(tmp_path)
    assert stored["headline"].equals(tables["headline"])
    md, page, figures = build_report(stored, tmp_path / "report", "test report", ["about"], {"sweep": 1.0})
    names = {p.name for p in figures}
    assert {"adaptation.png", "forgetting.png", "pareto.png", "preservation.png"} <= names
    assert "dcv_ioi_exact.png" in names
    for figure in figures:
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    first = text.split("## ")[1]
    assert first.startswith("The answer: SFT vs RL")
    # The primary endpoint first (V absolute at the highest accuracy both reach with 2 runs each), n per
    # method, both levels of claim; then the answer table; relative V is named as left out.
    assert first.startswith(
        "The answer: SFT vs RL (patching method exact)\n\nPrimary endpoint, circuit vulnerability V "
        "(absolute) at matched target accuracy 0.45 (n = 2 SFT and 2 RL runs): SFT - RL = "
    )
    assert "across seeds (Welch t, df " in first and "in these runs (item bootstrap): " in first
    assert "| circuit preservation P | target accuracy 0.45 | secondary |" in first
    # P's chance level (a random set of each checkpoint's circuit size: |C(M)| / N, as in the checkpoints
    # table) and how far above it each method is.
    p_row = answer_table(tables["headline"], "exact").filter(pl.col("metric") == "circuit preservation P")
    chance = tables["headline"].filter(
        (pl.col("metric") == "preservation") & (pl.col("training") == "sft") & (pl.col("matched_at") == 0.45)
    )["chance"][0]
    assert 0 < chance < 1 and p_row["chance (SFT/RL)"][0].startswith(f"{chance:.3g}/")
    assert p_row["above chance, these runs (SFT/RL)"][0].startswith("+")
    assert "4 items per probe, 20 target test items" in first
    assert "circuit vulnerability V (relative) is not in the answer: it fails its positive control" in first
    assert "What this experiment can detect: no planted-damage calibration was run" in first
    assert "](figures/adaptation.png)" in text and "Noise floor of circuit discovery" in text
    html = page.read_text()
    assert html.count("data:image/png;base64,") == len(figures)


def test_the_answer_names_each_probes_items_when_they_differ(tables):
    """One count is printed only when every probe has it: 16 of 4 probes at 32 is no n for the other 3."""
    from dcv.analysis.answer import answer_paragraphs

    headline = tables["headline"].with_columns(
        pl.lit(16).alias("n_probe_items"), pl.lit("ioi 32, capitals 32, induction 16").alias("probe_items")
    )
    text = " ".join(answer_paragraphs(headline, tables["base_circuits"], "exact", None))
    assert "probe items ioi 32, capitals 32, induction 16, 20 target test items" in text
    assert "16 items per probe" not in text


def test_read_analysis_names_the_missing_table(tmp_path):
    with pytest.raises(FileNotFoundError, match="base_circuits.parquet"):
        read_analysis(tmp_path)


def test_the_parent_run_gets_the_answer_as_one_table_and_a_few_metrics(tables, tmp_path):
    """The headline goes to MLflow as one table (replaced, not appended to, on a rerun) and the primary
    endpoint as a handful of metrics under valid names (it was one metric per cell: 1,336 on the demo)."""
    import json

    from mlflow.tracking import MlflowClient

    from dcv.analysis.answer import answer_table
    from dcv.experiment import primary_metrics, primary_verdict
    from dcv.tracking import RunLogger

    metrics = primary_metrics(tables["headline"], "exact")
    primary = tables["headline"].filter(pl.col("role") == "primary").row(0, named=True)
    assert metrics["primary/mean"] == pytest.approx(primary["mean"]) and metrics["primary/n_runs_rl"] == 2
    assert len(metrics) <= 12
    assert primary_verdict(tables["headline"], "exact").startswith("across seeds: ")
    table = answer_table(tables["headline"], "exact")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("t", artifact_location=str(tmp_path / "artifacts")))
    logger = RunLogger(client, run.info.run_id)
    logger.log_metrics(metrics)
    for _ in range(2):  # a rerun of the report stage
        logger.log_table(table, "answer.json")
    path = client.download_artifacts(run.info.run_id, "answer.json", str(tmp_path))
    stored = json.loads(Path(path).read_text())
    assert len(stored["data"]) == table.height and stored["columns"] == table.columns
    tags = client.get_run(run.info.run_id).data.tags
    assert json.loads(tags["mlflow.loggedArtifacts"]) == [{"path": "answer.json", "type": "table"}]
    assert len(client.get_run(run.info.run_id).data.metrics) == len(metrics)


def test_learned_masks_resample_the_probe_items_behind_forgetting(tmp_path):
    """Masks have one pseudo-item of patching parts, but forgetting comes from the per-item LDs: the
    mask method's forgetting and its CIs equal the exact method's (the same items, runs and draws)."""
    raw = config(tmp_path).model_dump(mode="json")
    raw["patching"]["methods"] = ["exact", "mask"]
    effects = effects_table()
    masks = effects.with_columns(
        pl.lit("mask").alias("method"),
        pl.col("effect")
        .clip(0, 1)
        .map_elements(lambda v: [v], return_dtype=pl.List(pl.Float64))
        .alias("item_delta"),
        pl.lit([1.0], pl.List(pl.Float64)).alias("item_denominator"),
    )
    circuits = circuits_table()
    circuits = pl.concat([circuits, circuits.with_columns(pl.lit("mask").alias("method"))])
    headline = analyze(parse_config(raw), results_table(), pl.concat([effects, masks]), circuits)["headline"]
    columns = ["matched_by", "matched_at", "training", "mean", "ci_low", "ci_high"]

    def of(method: str) -> pl.DataFrame:
        rows = headline.filter((pl.col("patching") == method) & (pl.col("metric") == "forgetting_ld"))
        return rows.select(columns).sort(columns)

    assert not of("mask").is_empty() and of("mask").equals(of("exact"))


def test_the_target_task_probe_is_reported_on_its_own(tmp_path):
    """chem (the target task's own probe) gets its numbers, but never enters prior-capability means."""
    raw = config(tmp_path).model_dump(mode="json")
    raw["target_task"]["answer_format"] = "letter"
    raw["probes"].append({"name": "chem", "n_items": N_ITEMS})
    chem_effects = effects_table().with_columns(
        pl.lit("chem").alias("probe"),
        (pl.col("item_delta").list.eval(pl.element() * 0.5)).alias("item_delta"),
    )
    circuits = circuits_table()
    results = results_table()
    results = results.with_columns(
        *[pl.col(f"probe/ioi/{m}").alias(f"probe/chem/{m}") for m in ("accuracy", "mean_ld", "item_ld")]
    )
    tables = analyze(
        parse_config(raw),
        results,
        pl.concat([effects_table(), chem_effects]),
        pl.concat([circuits, circuits.with_columns(pl.lit("chem").alias("probe"))]),
    )
    chem = tables["checkpoints"].filter(pl.col("probe") == "chem")
    assert (chem["status"] == "target probe").all() and not chem["in_means"].any()
    assert chem.filter((pl.col("trial") == "sft-seed0") & (pl.col("step") == 4))["circuit_vulnerability"][
        0
    ] == pytest.approx(0.4)
    base = tables["base_circuits"].filter(pl.col("probe") == "chem").row(0, named=True)
    assert "target task's own probe" in base["excluded_because"]
    sft4 = (
        tables["summary"].filter((pl.col("trial") == "sft-seed0") & (pl.col("step") == 4)).row(0, named=True)
    )
    assert sft4["n_probes_circuits"] == 1 and sft4["n_probes_forgetting"] == 1
    assert sft4["forgetting"] == pytest.approx(0.25)  # ioi's alone


def test_faithfulness_curve_areas_per_checkpoint_and_per_step(tmp_path):
    """The base's curve is 1 everywhere (CPR 1, CMD 0); SFT's falls linearly to the right size (F = x),
    RL's stays at 0.9: the areas and the per-step means are closed forms, with n runs."""
    fractions = [0.25, 0.5, 1.0]
    curves = {"base": [1.0] * 3, "sft": fractions, "rl": [0.9] * 3}
    circuits = circuits_table().with_columns(
        pl.lit(fractions).alias("curve_fractions"),
        pl.lit([1, 2, 4], dtype=pl.List(pl.Int32)).alias("curve_k"),
        pl.col("model")
        .map_elements(lambda m: curves[m.split("-")[0]], return_dtype=pl.List(pl.Float64))
        .alias("curve_faithfulness"),
    )
    tables = analyze(config(tmp_path), results_table(), effects_table(), circuits)
    areas = tables["faithfulness_areas"].filter(pl.col("probe") == "ioi")
    sft = areas.filter((pl.col("training") == "sft") & (pl.col("step") == 2))
    assert sft["cpr"].to_list() == pytest.approx([0.625] * 2)
    assert sft["cmd"].to_list() == pytest.approx([0.375] * 2)
    base = areas.filter(pl.col("model") == "base")
    assert base["cpr"].to_list() == pytest.approx([1.0] * base.height)
    assert base["cmd"].max() == pytest.approx(0)
    means = tables["faithfulness_area_means"].filter(pl.col("probe") == "mean")
    rl = means.filter((pl.col("training") == "rl") & (pl.col("step") == 4)).row(0, named=True)
    assert (rl["cpr"], rl["cmd"], rl["n_runs"]) == (pytest.approx(0.9), pytest.approx(0.1), 2)
    assert means.filter(pl.col("training") == "base")["n_runs"].to_list() == [1]
    curve = tables["faithfulness_curve_means"].filter(
        (pl.col("training") == "sft") & (pl.col("step") == 4) & (pl.col("probe") == "mean")
    )
    assert curve.sort("fraction")["faithfulness"].to_list() == pytest.approx(fractions)
    md, _, figures = build_report(tables, tmp_path / "report", "curves", ["about"], {})
    assert "faithfulness_curves.png" in {p.name for p in figures}
    assert "at step 4, the last step every method reached" in md.read_text()
    assert "SFT CPR 0.625, CMD 0.375 (n = 2 runs); RL CPR 0.9, CMD 0.1 (n = 2 runs)" in md.read_text()
    # A circuits table stored before the curves: no curve tables, and the report leaves the section out.
    old = analyze(config(tmp_path), results_table(), effects_table(), circuits_table())
    assert old["faithfulness_areas"].is_empty()


def headline_frame(rows: list[dict]) -> pl.DataFrame:
    """Headline rows with only what the report's sentences read."""
    base = {
        "patching": "exact",
        "training": "sft-rl",
        "status": "ok",
        "mean": 0.1,
        "ci_low": 0.05,
        "ci_high": 0.15,
        "mde": 0.02,
        "start_reached": 0.0,
        "n_probe_items": 16,
        "probe_items": "ioi 16",
        "n_target_items": 0,
    }
    return pl.DataFrame([{**base, **r} for r in rows])


def test_the_notes_give_the_runs_of_the_levels_the_answer_states():
    """Not the table's first row: a level with too few runs (1 SFT, 0 RL) comes first in it."""
    from dcv.analysis.answer import answer_notes

    rows = headline_frame(
        [
            {
                "matched_by": "accuracy",
                "matched_at": 0.5,
                "metric": "preservation",
                "n_runs_sft": 1,
                "n_runs_rl": 0,
                "status": "insufficient runs",
                "role": "other",
            },
            {
                "matched_by": "step",
                "matched_at": 4.0,
                "metric": "preservation",
                "n_runs_sft": 2,
                "n_runs_rl": 3,
                "role": "primary",
            },
            {
                "matched_by": "kl",
                "matched_at": 1.0,
                "metric": "preservation",
                "n_runs_sft": 2,
                "n_runs_rl": 2,
                "role": "secondary",
            },
        ]
    )
    base = pl.DataFrame(schema={"method": pl.String, "in_means": pl.Boolean, "probe": pl.String})
    text = " ".join(answer_notes(rows, base, "exact", None))
    assert "How to read it: 2 SFT and 2-3 RL runs, 16 items per probe" in text
    assert "(1 comparisons)" not in text and "Holm-adjusted" in text


def test_a_metric_that_never_varied_gets_no_minimum_detectable_difference():
    """An MDE of 0 (every model right on every item in every draw) is no detection limit: said so."""
    from dcv.analysis.answer import detection_sentence

    headline = headline_frame(
        [
            {
                "metric": "forgetting",
                "status": "no variation",
                "mde": 0.0,
                "mean": 0.0,
                "ci_low": 0.0,
                "ci_high": 0.0,
            },
            {"metric": "preservation", "mde": 0.03},
            {"metric": "preservation", "mde": 0.05},
        ]
    )
    text = detection_sentence(None, headline)
    assert "forgetting (probe accuracy) did not vary between runs or items at any matched level" in text
    assert (
        "below 0-0" not in text
        and "differences in circuit preservation P below 0.03-0.05 cannot be seen" in text
    )
