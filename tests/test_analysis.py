"""The analysis and the report on hand-built tables whose answers are known in closed form."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from dcv.analysis import analyze, read_analysis, write_analysis
from dcv.circuits.model_circuits import CIRCUITS_SCHEMA
from dcv.circuits.noise_floor import NOISE_FLOOR_SCHEMA
from dcv.circuits.pipeline import EFFECTS_SCHEMA
from dcv.config import parse_config
from dcv.report import build_report
from dcv.results import build_results_table
from tests.conftest import tiny_config_dict

HEADS = [(0, 0), (0, 1), (1, 0), (1, 1)]
BASE_EFFECTS = [1.0, 0.5, 0.1, 0.0]
BASE_CIRCUIT = [(0, 0), (0, 1)]
STEPS = (0, 2, 4)
# Target accuracy per step: SFT adapts faster than RL.
ACCURACY = {"sft": (0.25, 0.5, 0.75), "rl": (0.25, 0.35, 0.45)}
# Effects of every head are the base's times this factor: SFT loses 20% per 2 steps, RL 2.5%.
SCALE = {"sft": (1.0, 0.8, 0.6), "rl": (1.0, 0.975, 0.95)}
N_ITEMS = 4


def config(tmp_path: Path):
    raw = tiny_config_dict(tmp_path)
    raw["probes"] = [{"name": "ioi", "n_items": N_ITEMS}]
    raw["patching"]["methods"] = ["exact"]
    raw["circuits"].update(n_bootstrap=200)
    return parse_config(raw)


def results_table() -> pl.DataFrame:
    rows = []
    for method in ("sft", "rl"):
        for seed in (0, 1):
            trial = f"{method}-seed{seed}"
            for i, step in enumerate(STEPS):
                rows.append(
                    {
                        "trial": trial,
                        "method": method,
                        "learning_rate": 1e-5,
                        "seed": seed,
                        "init": "base",
                        "step": step,
                        "checkpoint": f"/ckpt/{trial}/{step}",
                        "metrics": {
                            "target/accuracy": ACCURACY[method][i],
                            "probe/ioi/accuracy": 1.0 - (1 - SCALE[method][i]) / 2,
                            "probe/ioi/mean_ld": 4.0 * SCALE[method][i],
                            "kl_to_base": 1.0 - SCALE[method][i],
                            "bench/t/acc": 0.5 * SCALE[method][i],
                            "bench/t/acc_norm": 0.0,  # not an accuracy column: left out of forgetting
                        },
                    }
                )
    return build_results_table(rows)


def effect_rows(model: str, trial: str, step: int, scale: float) -> list[dict]:
    rows = []
    for (layer, head), effect in zip(HEADS, BASE_EFFECTS, strict=True):
        # Per-item parts whose ratio of means is the effect: items differ, the mean does not.
        delta = [effect * scale * (1 + d) for d in (-0.1, 0.1, -0.05, 0.05)]
        rows.append(
            {
                "model": model,
                "probe": "ioi",
                "method": "exact",
                "layer": layer,
                "head": head,
                "effect": effect * scale,
                "n_items": N_ITEMS,
                "trial": trial,
                "step": step,
                "checkpoint": "x",
                "item_delta": delta,
                "item_denominator": [1.0] * N_ITEMS,
            }
        )
    return rows


def effects_table() -> pl.DataFrame:
    rows = effect_rows("base", "base", 0, 1.0)
    for method in ("sft", "rl"):
        for seed in (0, 1):
            for i, step in enumerate(STEPS[1:], start=1):
                trial = f"{method}-seed{seed}"
                rows += effect_rows(f"{trial}@{step}", trial, step, SCALE[method][i])
    return pl.DataFrame(rows, schema=EFFECTS_SCHEMA)


def circuits_table() -> pl.DataFrame:
    def row(model, trial, step, heads):
        return {
            "model": model,
            "trial": trial,
            "step": step,
            "probe": "ioi",
            "method": "exact",
            "size": len(heads),
            "faithfulness": 0.9,
            "reached_tau": True,
            "base_circuit_faithfulness": 0.9,
            "layers": [la for la, _ in heads],
            "heads": [h for _, h in heads],
        }

    rows = [row("base", "base", 0, BASE_CIRCUIT)]
    for method in ("sft", "rl"):
        for seed in (0, 1):
            trial = f"{method}-seed{seed}"
            for step in STEPS[1:]:
                # SFT's circuit loses head (0, 1) after step 2; RL keeps the base circuit.
                heads = [(0, 0), (1, 0)] if method == "sft" and step == 4 else BASE_CIRCUIT
                rows.append(row(f"{trial}@{step}", trial, step, heads))
    return pl.DataFrame(rows, schema=CIRCUITS_SCHEMA)


def noise_floor_table() -> pl.DataFrame:
    row = {"probe": "ioi", "method": "exact", "kind": "halves", "n_items": 2, "size_a": 2, "size_b": 2}
    return pl.DataFrame(
        [{**row, "jaccard": 0.6, "preservation": 0.75, "effect_spearman": 0.9}], schema=NOISE_FLOOR_SCHEMA
    )


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> dict[str, pl.DataFrame]:
    cfg = config(tmp_path_factory.mktemp("analysis"))
    return analyze(cfg, results_table(), effects_table(), circuits_table(), noise_floor_table())


def test_per_checkpoint_metrics(tables):
    rows = tables["checkpoints"]
    assert rows.height == 4 * len(STEPS)  # step 0 of every trial is the base model
    sft4 = rows.filter((pl.col("trial") == "sft-seed0") & (pl.col("step") == 4)).row(0, named=True)
    # Every circuit head keeps 60% of its base effect: v_h = 0.4 for each, so V = 0.4.
    assert sft4["circuit_vulnerability"] == pytest.approx(0.4)
    assert sft4["preservation"] == pytest.approx(0.5)
    assert sft4["forgetting_ld"] == pytest.approx(4.0 * 0.4)
    assert sft4["forgetting"] == pytest.approx(0.2)
    assert sft4["effect_spearman"] == pytest.approx(1.0)
    assert sft4["forgetting_bench"] == pytest.approx(0.5 - 0.5 * 0.6)
    base = rows.filter(pl.col("step") == 0)
    assert (base["circuit_vulnerability"].abs() < 1e-12).all() and (base["preservation"] == 1.0).all()


def test_headline_at_matched_accuracy_and_step(tables):
    headline = tables["headline"]

    def value(by: str, metric: str, training: str) -> pl.DataFrame:
        return headline.filter(
            (pl.col("matched_by") == by) & (pl.col("metric") == metric) & (pl.col("training") == training)
        ).row(0, named=True)

    # Both methods reach 0.45 (RL's best): SFT at step 1.6 (0.8 of the way from 0.25 to 0.5), V = 0.16;
    # RL at step 4, V = 0.05.
    at = value("accuracy", "circuit_vulnerability", "sft-rl")
    assert at["matched_at"] == pytest.approx(0.45)
    assert at["mean"] == pytest.approx(0.16 - 0.05)
    assert value("accuracy", "target_accuracy", "sft")["mean"] == pytest.approx(0.45)
    assert value("step", "forgetting_bench", "sft")["mean"] == pytest.approx(0.2)
    last = value("step", "circuit_vulnerability", "sft-rl")
    assert last["matched_at"] == 4 and last["mean"] == pytest.approx(0.4 - 0.05)
    assert last["n_runs"] == 2
    # Seeds are identical here, so the bootstrap over runs cannot move the mean.
    assert last["ci_low"] == pytest.approx(last["mean"]) and last["ci_high"] == pytest.approx(last["mean"])


def test_dcv_per_head_and_correlations(tables):
    dcv = tables["dcv_heads"].filter(pl.col("by") == "accuracy")
    assert sorted(zip(dcv["layer"], dcv["head"], strict=True)) == BASE_CIRCUIT
    assert dcv["dcv"].to_list() == pytest.approx([0.11, 0.11])
    # Items differ by +-10%, so the item bootstrap gives a real interval around the point.
    assert (dcv["ci_low"] < dcv["dcv"]).all() and (dcv["ci_high"] > dcv["dcv"]).all()
    by_step = tables["dcv_heads"].filter(pl.col("by") == "step")
    assert sorted(by_step["value"].unique().to_list()) == [2.0, 4.0]
    pooled = tables["correlations"].filter((pl.col("probe") == "mean") & (pl.col("training") == "pooled"))
    assert pooled["spearman_forgetting_ld"][0] == pytest.approx(1.0)
    assert pooled["n_checkpoints"][0] == 8


def test_noise_floor_beside_preservation(tables):
    rows = tables["checkpoints"]
    assert (rows["noise_floor_preservation"] == 0.75).all() and (rows["noise_floor_jaccard"] == 0.6).all()
    # SFT at step 4 keeps half the base circuit: below the base's agreement with itself (0.75).
    sft4 = rows.filter((pl.col("training") == "sft") & (pl.col("step") == 4))
    assert not sft4["within_noise_floor"].any()
    assert rows.filter(pl.col("training") == "rl")["within_noise_floor"].all()


def test_paper_comparison_table(tables):
    paper = {r["quantity"]: r for r in tables["paper"].iter_rows(named=True)}
    assert paper["circuit_size"]["base"] == 2 and paper["circuit_size"]["paper_base"] == 297
    # Final checkpoints (step 4): SFT keeps 1 of 2 base heads, RL both.
    assert paper["retention_pct"]["sft"] == pytest.approx(50.0)
    assert paper["retention_pct"]["rl"] == pytest.approx(100.0)
    assert paper["retention_pct"]["noise_floor_retention_pct"] == pytest.approx(75.0)
    assert paper["faithfulness"]["rl"] == pytest.approx(0.9) and paper["retention_pct"]["n_runs_sft"] == 2


def test_heads_weakened_by_sft_relative_to_rl(tables):
    dcv = tables["dcv_heads"].filter(pl.col("by") == "step")
    gap = {(r["value"], r["layer"], r["head"]): r for r in dcv.iter_rows(named=True)}
    # effect_gap = e(RL) - e(SFT): head 0.0 at step 4: 0.95 - 0.6; head 0.1 at step 2: 0.5 * (0.975 - 0.8).
    assert gap[(4.0, 0, 0)]["effect_gap"] == pytest.approx(0.35) and gap[(4.0, 0, 0)]["sft_weakened"]
    assert gap[(2.0, 0, 1)]["effect_gap"] == pytest.approx(0.0875)
    assert not gap[(2.0, 0, 1)]["sft_weakened"]  # below the default delta of 0.1


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
    results = pl.concat([results_table(), build_results_table(extra)], how="diagonal").sort("trial", "step")
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


def test_a_probe_the_base_model_cannot_do_has_nothing_to_preserve(tmp_path):
    """An empty base circuit (e.g. learned masks all 0): preservation and V are null, not an error."""
    circuits = circuits_table().with_columns(
        layers=pl.when(pl.col("model") == "base").then(pl.lit([], pl.List(pl.Int32))).otherwise("layers"),
        heads=pl.when(pl.col("model") == "base").then(pl.lit([], pl.List(pl.Int32))).otherwise("heads"),
    )
    tables = analyze(config(tmp_path), results_table(), effects_table(), circuits)
    assert tables["checkpoints"]["preservation"].is_null().all()
    assert tables["checkpoints"]["circuit_vulnerability"].is_null().all()
    assert tables["dcv_heads"].is_empty()
    metrics = set(tables["headline"]["metric"])
    assert "preservation" not in metrics and "forgetting" in metrics


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
    assert "Headline: SFT vs RL" in text and "circuit_vulnerability" in text
    assert "Beside the seed paper" in text and "Noise floor of circuit discovery" in text
    assert "](figures/adaptation.png)" in text
    assert "circuit vulnerability higher under SFT (+0.11, CI excludes 0)" in text
    html = page.read_text()
    assert html.count("data:image/png;base64,") == len(figures)
    assert "<table>" in html


def test_read_analysis_names_the_missing_table(tmp_path):
    with pytest.raises(FileNotFoundError, match="base_circuits.parquet"):
        read_analysis(tmp_path)
