"""comparison.each_pair (dcv.analysis.pairs): with external runs of three labels the pairs table compares
every pair in label order, the chosen pair's rows hold the headline's numbers, every verdict is
Bonferroni-corrected for the number of pairs, and the report says which pairs and which correction; the
config refuses it without three labels, naming the field. On the hand-built tables of tests/helpers.py, with
a third label (dpo) beside sft and rl."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import yaml

from dcv.analysis import TABLES, analyze
from dcv.analysis.headline import HIGHER, LOWER, UNRESOLVED, assign_roles
from dcv.analysis.pairs import PAIRS_SCHEMA, label_pairs
from dcv.cli import main
from dcv.config import ConfigError, parse_config
from dcv.experiment import _external_note
from dcv.report import build_report
from tests.helpers import STEPS, analysis_config_dict, circuits_table, effects_table, results_table

LABELS = ("sft", "rl", "dpo")
# The headline's columns a correction across pairs changes; every other column is the headline's own.
CORRECTED = ["p_adjusted", "verdict_runs", "verdict_seeds"]


def external_runs(labels: tuple[str, ...]) -> list[dict]:
    """The hand-built trials as external runs (never read: the analysis reads the tables)."""
    return [
        {
            "run": f"{label}-seed{seed}",
            "method": label,
            "checkpoints": [{"step": s, "path": f"/ckpt/{label}-seed{seed}/{s}"} for s in STEPS[1:]],
        }
        for label in labels
        for seed in (0, 1)
    ]


def pairs_config(tmp_path: Path, labels: tuple[str, ...] = LABELS, **comparison) -> dict:
    raw = analysis_config_dict(tmp_path)
    raw["external"] = {"runs": external_runs(labels)}
    raw["comparison"] = comparison
    return raw


def analyzed(raw: dict) -> dict[str, pl.DataFrame]:
    return analyze(parse_config(raw), results_table(LABELS), effects_table(LABELS), circuits_table(LABELS))


@pytest.fixture(scope="module")
def each_pair(tmp_path_factory) -> dict[str, pl.DataFrame]:
    return analyzed(pairs_config(tmp_path_factory.mktemp("pairs"), each_pair=True))


@pytest.fixture(scope="module")
def chosen_only(tmp_path_factory) -> dict[str, pl.DataFrame]:
    return analyzed(pairs_config(tmp_path_factory.mktemp("chosen")))


def test_each_pair_off_adds_only_an_empty_pairs_table(tmp_path, chosen_only, each_pair):
    """Off (the default), the tables are those of the sweep's sft/rl tables, and the pairs table is empty
    with its schema; on, every other table is unchanged."""
    sweep_only = analyze(
        parse_config(analysis_config_dict(tmp_path)), results_table(), effects_table(), circuits_table()
    )
    assert list(chosen_only) == list(TABLES) and chosen_only["pairs"].is_empty()
    assert chosen_only["pairs"].schema == pl.Schema(PAIRS_SCHEMA)
    for name in TABLES:
        if name != "pairs":
            assert chosen_only[name].equals(sweep_only[name]), name
            assert each_pair[name].equals(chosen_only[name]), name


def test_every_pair_in_label_order_and_the_chosen_pair_is_the_headline(each_pair):
    pairs, headline = each_pair["pairs"], each_pair["headline"]
    order = [("sft", "rl"), ("sft", "dpo"), ("rl", "dpo")]
    assert pairs.select("first", "second").unique(maintain_order=True).rows() == order
    # Three pairs per metric: each (level, metric, slot) row once per pair, the pairs in order.
    per_metric = pairs.group_by(
        "patching", "matched_by", "matched_at", "metric", "training", maintain_order=True
    )
    assert per_metric.agg(pl.struct("first", "second")).to_series(-1).to_list()[0] == [
        {"first": a, "second": b} for a, b in order
    ]
    chosen = pairs.filter((pl.col("first") == "sft") & (pl.col("second") == "rl")).drop("first", "second")
    assert chosen.drop(CORRECTED).equals(headline.drop(CORRECTED))
    # Bonferroni over 3 pairs: the headline's adjusted p times 3, at most 1.
    stated = headline["p_adjusted"].is_not_null()
    expected = (headline["p_adjusted"].filter(stated) * 3).clip(upper_bound=1.0)
    assert chosen["p_adjusted"].filter(stated).to_list() == pytest.approx(expected.to_list())
    assert chosen["p_adjusted"].filter(~stated).is_null().all() and expected.len() > 1
    assert chosen.filter(pl.col("role") == "primary").height == 1
    # V (absolute) at step 4, secondary: its Holm p lies between alpha / 3 and alpha = 0.05. Alone it is a
    # verdict (the headline's); among 3 pairs it is not.
    at4 = (pl.col("matched_by") == "step") & (pl.col("matched_at") == 4.0)
    at4 &= pl.col("metric") == "circuit_vulnerability_abs"
    at4 &= pl.col("training") == "sft-rl"
    alone, among = headline.filter(at4).row(0, named=True), chosen.filter(at4).row(0, named=True)
    assert 0.05 / 3 < alone["p_adjusted"] < 0.05 <= among["p_adjusted"]
    assert alone["verdict_seeds"] == HIGHER and among["verdict_seeds"] == UNRESOLVED


def test_another_pair_is_the_headline_that_pair_would_give(tmp_path, each_pair):
    """sft vs dpo in the pairs table: the numbers of an analysis whose comparison.methods is [sft, dpo]."""
    alone = analyzed(pairs_config(tmp_path, methods=["sft", "dpo"]))["headline"]
    pair = each_pair["pairs"].filter((pl.col("first") == "sft") & (pl.col("second") == "dpo"))
    assert pair.drop("first", "second", *CORRECTED).equals(alone.drop(CORRECTED))
    assert pair.filter(pl.col("role") == "secondary").height > 0


def test_the_chosen_pair_keeps_its_order_among_the_pairs(tmp_path):
    cfg = parse_config(pairs_config(tmp_path, methods=["dpo", "sft"], each_pair=True))
    assert label_pairs(cfg) == [("sft", "rl"), ("dpo", "sft"), ("rl", "dpo")]
    assert label_pairs(parse_config(pairs_config(tmp_path))) == []


def verdict_rows() -> list[dict]:
    """A primary row at p 0.03 and two secondary rows at p 0.01 and 0.02 (Holm: 0.02 each), all between
    alpha / 3 and alpha = 0.05: a verdict alone, none among 3 pairs."""
    common = {"training": "sft-rl", "status": "ok", "role": "other", "mean": 0.1, "matched_by": "accuracy"}
    at = {**common, "matched_at": 0.5}
    return [
        {**at, "metric": "circuit_vulnerability_abs", "p_value": 0.03, "p_runs": 0.03},
        {**at, "metric": "preservation", "p_value": 0.01, "p_runs": 0.01},
        {**at, "metric": "jaccard", "p_value": 0.02, "p_runs": 0.02},
    ]


def test_a_p_between_alpha_over_the_pairs_and_alpha_gets_no_verdict(tmp_path):
    cfg = parse_config(analysis_config_dict(tmp_path))
    alone = assign_roles(cfg, verdict_rows(), 0.05)
    among = assign_roles(cfg, verdict_rows(), 0.05, n_pairs=3)
    assert [r["role"] for r in alone] == ["primary", "secondary", "secondary"]
    assert [r["verdict_seeds"] for r in alone] == [HIGHER] * 3
    assert [r["verdict_runs"] for r in alone] == [HIGHER] * 3
    assert [r["p_adjusted"] for r in among] == pytest.approx([0.09, 0.06, 0.06])
    assert [r["verdict_seeds"] for r in among] == [UNRESOLVED] * 3
    assert [r["verdict_runs"] for r in among] == [UNRESOLVED] * 3
    # Below alpha / 3 a verdict stands among 3 pairs too.
    rows = verdict_rows()
    rows[0] |= {"p_value": 0.01, "mean": -0.1}
    assert assign_roles(cfg, rows, 0.05, n_pairs=3)[0]["verdict_seeds"] == LOWER


def test_the_report_names_the_pairs_and_the_correction(each_pair, chosen_only, tmp_path):
    md, _, _ = build_report(each_pair, tmp_path / "each", "t", ["about"], {})
    section = md.read_text().split("## Every pair of method labels")[1].split("\n## ")[0]
    assert "3 pairs: SFT vs RL, SFT vs DPO, RL vs DPO" in section
    assert "Bonferroni" in section and "union bound" in section and "multiplied by 3" in section
    assert "| SFT vs DPO |" in section and "p (adjusted, x3)" in section
    md, _, _ = build_report(chosen_only, tmp_path / "chosen", "t", ["about"], {})
    assert "Every pair of method labels" not in md.read_text()


def test_the_about_line_says_every_pair_is_compared(tmp_path):
    note = _external_note(parse_config(pairs_config(tmp_path, each_pair=True)), results_table(LABELS))
    assert "compared: sft vs rl" in note and "every pair of labels also, in the pairs table (3 pairs" in note
    assert "runs labelled dpo are not compared" in _external_note(
        parse_config(pairs_config(tmp_path)), results_table(LABELS)
    )


def test_each_pair_needs_three_labels_and_says_which_field(tmp_path):
    cases = {
        "no external runs": {**analysis_config_dict(tmp_path), "comparison": {"each_pair": True}},
        "external run labels ['sft', 'rl']": pairs_config(tmp_path, ("sft", "rl"), each_pair=True),
    }
    for got, raw in cases.items():
        with pytest.raises(ConfigError) as caught:
            parse_config(raw)
        assert "comparison.each_pair: true needs external runs with 3 or more method labels" in str(
            caught.value
        )
        assert got in str(caught.value)
    # dcv validate refuses the same file, before anything runs.
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(cases["external run labels ['sft', 'rl']"]))
    assert main(["validate", str(path)]) == 2


def test_the_report_and_the_answer_name_the_compared_labels(tmp_path):
    """comparison.methods [dpo, sft]: the answer and its table name DPO and SFT (the
    tables' sft and rl slots), never RL."""
    from dcv.analysis.answer import answer_paragraphs

    tables = analyzed(pairs_config(tmp_path, methods=["dpo", "sft"]))
    md, _, _ = build_report(tables, tmp_path / "report", "t", ["about"], {}, labels=("dpo", "sft"))
    text = md.read_text()
    answer = text.split("\n## ")[1]
    assert answer.startswith("The answer: DPO vs SFT (patching method ")
    assert "DPO - SFT = " in answer and "| DPO | SFT | DPO - SFT |" in answer and "n (DPO/SFT)" in answer
    paragraphs = answer_paragraphs(
        tables["headline"], tables["base_circuits"], "exact", None, None, ("dpo", "sft")
    )
    assert not any("RL" in p.replace("RL's Razor", "") for p in paragraphs), paragraphs
