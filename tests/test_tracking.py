"""MLflow tracking against a real SQLite store."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from dcv import tracking
from dcv.config import parse_config
from tests.helpers import tiny_config_dict


def test_flatten_params():
    flat = tracking.flatten_params(
        {"sft": {"learning_rate": 1e-5, "rollout": {"backend": "hf"}}, "seeds": [0, 1]}
    )
    assert flat == {"sft.learning_rate": "1e-05", "sft.rollout.backend": "hf", "seeds": "[0, 1]"}


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = tiny_config_dict(tmp_path / "store")
    cfg = parse_config(raw)
    assert tracking.resolve_tracking_uri(cfg) == f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.resolve_tracking_uri(cfg) == "http://127.0.0.1:5999"
    cfg = parse_config({**raw, "tracking": {"uri": "http://127.0.0.1:5000"}})
    assert tracking.resolve_tracking_uri(cfg) == "http://127.0.0.1:5000"


def test_object_store_needs_a_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = parse_config({**tiny_config_dict(tmp_path), "storage": {"root": "s3://bucket/dcv"}})
    with pytest.raises(ValueError, match="tracking.uri"):
        tracking.resolve_tracking_uri(cfg)


def test_parent_run_is_reused_and_children_nest(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = parse_config(tiny_config_dict(tmp_path / "store"))
    parent = tracking.get_or_create_parent_run(cfg).run_id
    assert tracking.get_or_create_parent_run(cfg).run_id == parent
    for step_name in ("a", "b"):
        with tracking.child_run(cfg, f"child-{step_name}", tags={"dcv.stage": step_name}) as run:
            run.log_metrics({"probe/ioi/accuracy": 0.5}, step=3)
    with pytest.raises(RuntimeError), tracking.child_run(cfg, "child-c"):
        raise RuntimeError("stage failed")
    client = MlflowClient(tracking.resolve_tracking_uri(cfg))
    experiment = client.get_experiment_by_name("tiny-test")
    assert experiment.artifact_location.startswith((tmp_path / "store").as_uri())
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert sorted(r.info.run_name for r in children) == ["child-a", "child-b", "child-c"]
    assert {r.info.run_name: r.info.status for r in children}["child-c"] == "FAILED"
    assert len(runs) == 4
    child = next(r for r in children if r.info.run_name == "child-a")
    history = client.get_metric_history(child.info.run_id, "probe/ioi/accuracy")
    assert [(m.step, m.value) for m in history] == [(3, 0.5)]
    assert child.data.params["sft.learning_rate"] == str(cfg.sft.learning_rate)
    assert child.data.metrics["probe/ioi/accuracy"] == 0.5
    assert client.get_run(parent).data.params["model.name"] == "tiny"
    assert (tmp_path / "store" / "mlflow.db").is_file()


def test_object_store_with_a_tracking_uri_logs(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'server.db'}"
    raw = {**tiny_config_dict(tmp_path), "storage": {"root": "s3://bucket/dcv"}, "tracking": {"uri": uri}}
    cfg = parse_config(raw)
    with tracking.child_run(cfg, "on-object-store") as run:
        run.log_metrics({"x": 1.0})
    assert MlflowClient(uri).get_run(run.run_id).data.metrics["x"] == 1.0
