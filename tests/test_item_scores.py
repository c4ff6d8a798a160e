"""Per-item scores: from evaluation, through each checkpoint's json and the base scores cache, into the
results table's list columns (parquet) and out of its CSV."""

from __future__ import annotations

import json
from statistics import fmean

import polars as pl
import pytest

from dcv.benchmarks import SCORES_SCHEMA, join_benchmarks
from dcv.config import EvaluationConfig, ProbeConfig, TargetTaskConfig
from dcv.evaluation import evaluate_model, probe_logit_diffs
from dcv.results import build_results_table, read_results, write_results
from dcv.storage import results_dir
from dcv.tasks import load_target_splits
from dcv.tasks.probes import build_probe
from dcv.training.checkpoint_folders import METADATA_FILE
from dcv.training.checkpoints import EvaluationKit
from dcv.training.sweep import TrialSpec, collect_results
from dcv.training.trial import list_checkpoints, trials_root
from tests.helpers import results_row

EVAL = EvaluationConfig(batch_size=4, max_new_tokens=6, kl_prompts=4, kl_max_new_tokens=6, kl_seed=0)
PROBES = ("ioi", "induction")


@pytest.fixture(scope="module")
def scored(tiny_model, tokenizer):
    test_items = load_target_splits(TargetTaskConfig(n_train=8, n_test=6))[1]
    probes = [build_probe(ProbeConfig(name=n, n_items=5), tokenizer, TargetTaskConfig()) for n in PROBES]
    scores = evaluate_model(tiny_model, tokenizer, EVAL, test_items, probes)
    return scores, test_items, probes


def test_item_vectors_have_one_score_per_item_in_item_order(scored, tiny_model):
    scores, test_items, probes = scored
    assert set(scores.item_scores) == {"target/correct", "probe/ioi/ld", "probe/induction/ld"}
    assert len(scores.item_scores["target/correct"]) == len(test_items) == 6
    assert set(scores.item_scores["target/correct"]) <= {0.0, 1.0}
    for probe in probes:
        ld = scores.item_scores[f"probe/{probe.name}/ld"]
        assert len(ld) == len(probe) == 5
        assert ld == probe_logit_diffs(tiny_model, probe.items, EVAL.batch_size).tolist()
        assert all(isinstance(v, float) for v in ld)


def test_item_means_are_the_metrics_exactly(scored):
    scores, _, probes = scored
    correct = scores.item_scores["target/correct"]
    assert fmean(correct) == sum(correct) / len(correct) == scores.metrics["target/accuracy"]
    for probe in probes:
        ld = scores.item_scores[f"probe/{probe.name}/ld"]
        assert fmean(ld) == scores.metrics[f"probe/{probe.name}/mean_ld"]
        assert sum(v > 0 for v in ld) / len(ld) == scores.metrics[f"probe/{probe.name}/accuracy"]
    assert all(type(v) is float for v in scores.metrics.values())  # MLflow and Ray get plain floats


def test_base_scores_cache_keeps_item_scores_and_ignores_stale_files(tiny_config, tiny_model, tokenizer):
    kit = EvaluationKit.build(tiny_config, tokenizer)
    path = kit.base_scores_file()
    path.parent.mkdir(parents=True, exist_ok=True)  # the kit wrote its KL reference there
    path.write_text(json.dumps({"target/accuracy": 0.5}))  # a file of the old shape: metrics only
    first = kit.evaluate_base(tiny_model)
    assert "kl_to_base" in first.metrics  # evaluated again, not the stale file's metrics
    assert len(first.item_scores["target/correct"]) == len(kit.test_items)
    assert json.loads(path.read_text()) == {"metrics": first.metrics, "item_scores": first.item_scores}
    assert kit.evaluate_base(tiny_model) == first  # read back, not evaluated again


def _row(trial: str, step: int, item_scores: dict | None = None) -> dict:
    metrics = {"step": float(step), "target/accuracy": 0.5, "probe/ioi/mean_ld": 1.0}
    return results_row(trial, step, f"/ckpt/{trial}/{step}", metrics, item_scores)


ITEMS = {"target/correct": [1.0, 0.0], "probe/ioi/ld": [1.5, 0.5]}


def test_results_table_without_item_scores_has_no_list_columns():
    table = build_results_table([_row("sft-a", 0), _row("sft-a", 4)])
    assert not any(isinstance(t, pl.List) for t in table.schema.values())
    assert table.schema["target/accuracy"] == pl.Float64


def test_results_table_item_columns_are_float_lists_null_where_missing():
    table = build_results_table([_row("sft-a", 4, ITEMS), _row("sft-a", 0), _row("rl-a", 0, {})])
    assert table.schema["target/item_correct"] == pl.List(pl.Float64)
    assert table.schema["probe/ioi/item_ld"] == pl.List(pl.Float64)
    assert table["target/item_correct"].to_list() == [None, None, [1.0, 0.0]]  # sorted by trial, step
    assert table["probe/ioi/item_ld"].to_list() == [None, None, [1.5, 0.5]]
    assert table["target/accuracy"].to_list() == [0.5, 0.5, 0.5]


def test_write_read_round_trip_keeps_lists_in_parquet_and_writes_the_csv(tmp_path):
    table = build_results_table([_row("sft-a", 0, ITEMS), _row("sft-a", 4)])
    write_results(table, tmp_path)
    back = read_results(tmp_path)
    assert back.equals(table)
    assert back["target/item_correct"].to_list() == [[1.0, 0.0], None]
    csv = pl.read_csv(results_dir(tmp_path) / "checkpoints.csv")
    assert csv.columns == [c for c in table.columns if not c.endswith(("/item_correct", "/item_ld"))]
    assert csv["target/accuracy"].to_list() == [0.5, 0.5]


def test_join_benchmarks_keeps_the_item_columns():
    table = build_results_table([_row("sft-a", 0, ITEMS), _row("sft-a", 4, ITEMS)])
    scores = pl.DataFrame(
        [("base", "base", 0, "bench/arc/acc", 0.25), ("sft-a@4", "sft-a", 4, "bench/arc/acc", 0.5)],
        schema=SCORES_SCHEMA,
        orient="row",
    )
    joined = join_benchmarks(table, scores)
    assert joined["bench/arc/acc"].to_list() == [0.25, 0.5]
    assert joined["probe/ioi/item_ld"].to_list() == [[1.5, 0.5], [1.5, 0.5]]


def test_collect_results_reads_item_scores_from_checkpoint_json(tiny_config, tiny_model):
    """Checkpoint folders as Ray Train leaves them: one written with item scores, one from before them."""
    trial_dir = trials_root(tiny_config) / "sft-a"
    for step, extra in ((0, {"item_scores": ITEMS}), (4, {})):
        folder = trial_dir / f"checkpoint_{step:06d}"
        tiny_model.save_pretrained(folder)  # a checkpoint without loadable weights is left out
        meta = {"step": step, "method": "sft", "trial": "sft-a", "metrics": {"target/accuracy": 0.5}}
        (folder / METADATA_FILE).write_text(json.dumps({**meta, **extra}))
    records = list_checkpoints(trial_dir)
    assert [r.item_scores for r in records] == [ITEMS, {}]
    table = collect_results(tiny_config, [TrialSpec("sft-a", "sft", 1e-5, 0, ())])
    assert table["target/item_correct"].to_list() == [[1.0, 0.0], None]
    assert table["probe/ioi/item_ld"].to_list() == [[1.5, 0.5], None]
