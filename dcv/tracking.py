"""MLflow tracking: the only module that calls ``mlflow``.

Run hierarchy: one **parent run** per experiment (found again by its tags, so reruns reuse it), and
**child runs** beneath it (one per evaluation, trial, or stage). The tracking URI is, in order:
``tracking.uri`` from the config, ``$MLFLOW_TRACKING_URI``, else a SQLite database inside the storage
folder (``sqlite:///<storage>/mlflow.db``) with artifacts beside it in ``<storage>/mlartifacts``.
Credentials for a tracking server come from the environment (``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD`` / ``MLFLOW_TRACKING_TOKEN``), never from the config or params.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from dcv.config import ExperimentConfig, config_to_dict

PARENT_TAG = "dcv.parent"
EXPERIMENT_TAG = "dcv.experiment"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


def is_remote_storage(root: str) -> bool:
    return "://" in root and not root.startswith("file://")


def local_storage_root(cfg: ExperimentConfig) -> Path:
    """The storage folder as an absolute local path (object-store roots have none)."""
    if is_remote_storage(cfg.storage.root):
        raise ValueError(f"storage.root={cfg.storage.root!r} is not a local folder")
    return Path(cfg.storage.root.removeprefix("file://")).expanduser().resolve()


def resolve_tracking_uri(cfg: ExperimentConfig) -> str:
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if is_remote_storage(cfg.storage.root):
        raise ValueError(
            f"tracking.uri: storage.root={cfg.storage.root!r} is an object store, which cannot hold the default "
            "SQLite database; set tracking.uri or MLFLOW_TRACKING_URI to a tracking server"
        )
    root = local_storage_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"sft": {"learning_rate": 1e-5}}`` -> ``{"sft.learning_rate": "1e-05"}``; lists stay one value."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


def _experiment_id(cfg: ExperimentConfig, client: MlflowClient) -> str:
    name = cfg.tracking.experiment_name
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if not (cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")):
        # With the default SQLite store, keep artifacts in storage (MLflow's default is ./mlruns in the cwd).
        artifact_location = (local_storage_root(cfg) / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException:
        # Another process created it between our lookup and create.
        return client.get_experiment_by_name(name).experiment_id


def get_or_create_parent_run(cfg: ExperimentConfig) -> str:
    """The id of this experiment's parent run; the same id on every rerun of the same config name."""
    mlflow.set_tracking_uri(resolve_tracking_uri(cfg))
    client = MlflowClient()
    experiment_id = _experiment_id(cfg, client)
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = 'true' and tags.`{EXPERIMENT_TAG}` = '{cfg.name}'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        experiment_id, run_name=cfg.name, tags={PARENT_TAG: "true", EXPERIMENT_TAG: cfg.name}
    )
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in config_params(cfg).items()])
    return run.info.run_id


def config_params(cfg: ExperimentConfig) -> dict[str, str]:
    return flatten_params(config_to_dict(cfg))


@contextmanager
def child_run(
    cfg: ExperimentConfig, run_name: str, tags: Mapping[str, str] | None = None
) -> Iterator[mlflow.ActiveRun]:
    """Start a child run of the experiment's parent run, with the config as params."""
    parent_id = get_or_create_parent_run(cfg)
    experiment_id = MlflowClient().get_run(parent_id).info.experiment_id
    all_tags = {EXPERIMENT_TAG: cfg.name, **(tags or {})}
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=run_name, parent_run_id=parent_id, tags=all_tags
    ) as run:
        mlflow.log_params(config_params(cfg))
        yield run


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log to the active run; MLflow metric names may not contain some characters, '/' is fine."""
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_params(params: Mapping[str, Any]) -> None:
    mlflow.log_params({k: str(v)[:MAX_PARAM_LENGTH] for k, v in params.items()})


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path=artifact_path)
