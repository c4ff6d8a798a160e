"""MLflow tracking: the only module that calls ``mlflow``.

It uses an explicit ``MlflowClient`` per run, never the fluent API's global active run: a Ray worker,
a Tune trial and the driver each log to their own run without touching process-wide state.

Run hierarchy: one **parent run** per experiment (found again by its tags, so reruns reuse it), and
**child runs** beneath it (one per evaluation, trial, or stage). The tracking URI is, in order:
``tracking.uri`` from the config, ``$MLFLOW_TRACKING_URI``, else a SQLite database inside the storage
folder (``sqlite:///<storage>/mlflow.db``) with artifacts beside it in ``<storage>/mlartifacts``.
Credentials for a tracking server come from the environment (``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD`` / ``MLFLOW_TRACKING_TOKEN``), never from the config or params.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import polars as pl
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from dcv.config import ExperimentConfig, config_to_dict
from dcv.object_store import ObjectPath
from dcv.storage import StoragePath, as_path, is_remote_storage, storage_root

PARENT_TAG = "dcv.parent"
EXPERIMENT_TAG = "dcv.experiment"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
LOGGED_ARTIFACTS_TAG = "mlflow.loggedArtifacts"  # how the MLflow UI finds a run's tables


def default_tracking_uri(cfg: ExperimentConfig) -> str:
    return f"sqlite:///{storage_root(cfg) / 'mlflow.db'}"


def resolve_tracking_uri(cfg: ExperimentConfig) -> str:
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if is_remote_storage(cfg.storage.root):
        raise ValueError(
            f"tracking.uri: storage.root={cfg.storage.root!r} is an object store, which cannot hold the "
            "default SQLite database; set tracking.uri or MLFLOW_TRACKING_URI to a tracking server"
        )
    storage_root(cfg).mkdir(parents=True, exist_ok=True)
    return default_tracking_uri(cfg)


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


def config_params(cfg: ExperimentConfig) -> dict[str, str]:
    return flatten_params(config_to_dict(cfg))


@dataclass(frozen=True)
class RunLogger:
    """Logs to one MLflow run through an explicit client: no global state, safe in any process."""

    client: MlflowClient
    run_id: str

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for start in range(0, len(batch), 1000):  # MLflow accepts at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def log_params(self, params: Mapping[str, Any]) -> None:
        batch = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for start in range(0, len(batch), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=batch[start : start + 100])

    def log_artifact(self, path: str | StoragePath, artifact_path: str | None = None) -> None:
        """Log a file; one under an object-store root is read from there (MLflow logs local files)."""
        path = as_path(path)
        if not isinstance(path, ObjectPath):
            self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)
            return
        with tempfile.TemporaryDirectory(prefix="dcv-artifact-") as folder:
            local = Path(folder) / path.name
            local.write_bytes(path.read_bytes())
            self.client.log_artifact(self.run_id, str(local), artifact_path=artifact_path)

    def log_table(self, table: pl.DataFrame, artifact_file: str) -> None:
        """``table`` as an MLflow table (JSON, orient "split", the run's ``mlflow.loggedArtifacts`` tag), as
        ``MlflowClient.log_table`` writes it, but replaced rather than appended to on a rerun."""
        folder = Path(tempfile.mkdtemp(prefix="dcv-table-"))
        try:
            path = folder / Path(artifact_file).name
            table.to_pandas().to_json(path, orient="split", index=False)
            parent = str(Path(artifact_file).parent)
            self.log_artifact(path, None if parent == "." else parent)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        tags = self.client.get_run(self.run_id).data.tags
        logged = json.loads(tags.get(LOGGED_ARTIFACTS_TAG, "[]"))
        entry = {"path": artifact_file, "type": "table"}
        if entry not in logged:
            self.set_tag(LOGGED_ARTIFACTS_TAG, json.dumps([*logged, entry]))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def restart(self) -> None:
        """Mark a finished run RUNNING again (a rerun of the same experiment continues it)."""
        self.client.update_run(self.run_id, status="RUNNING")

    @classmethod
    def attach(cls, tracking_uri: str, run_id: str) -> RunLogger:
        """Log to an existing run from another process (a Ray worker)."""
        return cls(MlflowClient(tracking_uri=tracking_uri), run_id)


def _experiment_id(cfg: ExperimentConfig, client: MlflowClient, uri: str) -> str:
    name = cfg.tracking.experiment_name
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if not is_remote_storage(cfg.storage.root) and uri == default_tracking_uri(cfg):
        # With the default SQLite store, keep artifacts in storage (MLflow's default is ./mlruns in the cwd).
        artifact_location = (storage_root(cfg) / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:
        # Another process created it between our lookup and create.
        return client.get_experiment_by_name(name).experiment_id


def get_or_create_parent_run(cfg: ExperimentConfig) -> RunLogger:
    """This experiment's parent run; the same run on every rerun of a config with the same name."""
    uri = resolve_tracking_uri(cfg)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = _experiment_id(cfg, client, uri)
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = 'true' and tags.`{EXPERIMENT_TAG}` = '{cfg.name}'",
        max_results=1,
    )
    if found:
        return RunLogger(client, found[0].info.run_id)
    run = client.create_run(
        experiment_id, run_name=cfg.name, tags={PARENT_TAG: "true", EXPERIMENT_TAG: cfg.name}
    )
    parent = RunLogger(client, run.info.run_id)
    parent.log_params(config_params(cfg))
    return parent


RUN_KEY_TAG = "dcv.run_key"


def _create_child_run(cfg: ExperimentConfig, run_name: str, tags: Mapping[str, str]) -> RunLogger:
    parent = get_or_create_parent_run(cfg)
    experiment_id = parent.client.get_run(parent.run_id).info.experiment_id
    run = parent.client.create_run(
        experiment_id,
        run_name=run_name,
        tags={MLFLOW_PARENT_RUN_ID: parent.run_id, EXPERIMENT_TAG: cfg.name, **tags},
    )
    logger = RunLogger(parent.client, run.info.run_id)
    logger.log_params(config_params(cfg))
    return logger


def get_or_create_child_run(
    cfg: ExperimentConfig, run_name: str, tags: Mapping[str, str] | None = None
) -> RunLogger:
    """The child run named ``run_name`` under the parent run: created once, found again on every rerun."""
    parent = get_or_create_parent_run(cfg)
    experiment_id = parent.client.get_run(parent.run_id).info.experiment_id
    same_key = f"tags.`{RUN_KEY_TAG}` = '{run_name}'"
    same_parent = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.run_id}'"
    found = parent.client.search_runs(
        [experiment_id], filter_string=f"{same_key} and {same_parent}", max_results=1
    )
    if found:
        return RunLogger(parent.client, found[0].info.run_id)
    return _create_child_run(cfg, run_name, {RUN_KEY_TAG: run_name, **(tags or {})})


def retire_child_run(cfg: ExperimentConfig, run_name: str, reason: str) -> str | None:
    """Delete the child run named ``run_name`` (MLflow's soft delete: ``mlflow runs restore --run-id``
    brings it back), so that redone work logs into a fresh run and no metric is logged twice; its tag
    ``dcv.retired`` says why. Returns the retired run's id, or None when there was none."""
    parent = get_or_create_parent_run(cfg)
    experiment_id = parent.client.get_run(parent.run_id).info.experiment_id
    same_key = f"tags.`{RUN_KEY_TAG}` = '{run_name}'"
    same_parent = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.run_id}'"
    found = parent.client.search_runs([experiment_id], filter_string=f"{same_key} and {same_parent}")
    for run in found:
        parent.client.set_tag(run.info.run_id, "dcv.retired", reason)
        parent.client.delete_run(run.info.run_id)
    return found[0].info.run_id if found else None


@contextmanager
def child_run(
    cfg: ExperimentConfig, run_name: str, tags: Mapping[str, str] | None = None
) -> Iterator[RunLogger]:
    """A new child run of the parent run, with the config as params; FAILED if the body raises."""
    logger = _create_child_run(cfg, run_name, dict(tags or {}))
    try:
        yield logger
    except BaseException:
        logger.finish("FAILED")
        raise
    logger.finish()


class TrackingServerError(ValueError):
    """The tracking server cannot be used; a ValueError, so the CLI reports it like any bad setting."""


def tracking_server_gone(uri: str) -> str | None:
    """After a failure: a clear error when ``uri`` is an http(s) tracking server that no longer answers,
    else None (the failure had another cause, or the store is a file).

    dcv does not buffer metrics itself. Every MLflow request already retries
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7, with exponential backoff: about 4 minutes), which
    rides out a server restart; a server gone for longer stops the run with this error."""
    try:
        check_tracking_server(uri, connect_timeout=5.0, read_timeout=10.0)
    except TrackingServerError as exc:
        reason = str(exc).split(": ", 2)[-1].split(";")[0]
        return (
            f"[tracking] uri={redact_uri(uri)}: the MLflow tracking server stopped answering during the run "
            f"({reason}, after MLflow's retries); what finished is kept: start the server again "
            "(mlflow/serve) and rerun the same command"
        )
    return None


def redact_uri(uri: str) -> str:
    """``uri`` without the user and password it may carry (``http://***@host:5000``), for messages."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def _connection_failure(exc: BaseException, timeouts: tuple[float, float]) -> str:
    """A short, secret-free reason from the requests error behind an MLflow request failure."""
    import requests

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, requests.Timeout) or (
            isinstance(seen, requests.ConnectionError) and "timed out" in str(seen)
        ):
            return f"no answer within {timeouts[0]:g} s (connect) / {timeouts[1]:g} s (reply)"
        if isinstance(seen, requests.ConnectionError):
            errno = re.search(r"\[Errno -?\d+\] [^\"')]+", str(seen))
            return f"cannot connect ({errno.group(0) if errno else type(seen).__name__})"
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__


def check_tracking_server(uri: str, connect_timeout: float = 5.0, read_timeout: float = 30.0) -> None:
    """Fail fast when an http(s) tracking server is down or refuses this process's credentials.

    One authenticated read (search one experiment), no retries. A refused connection fails at once, an
    unreachable host after ``connect_timeout`` seconds; a busy server may take a few seconds to check a
    password (MLflow hashes it on every request unless its auth cache is on), hence the longer
    ``read_timeout``. Credentials come from the environment as for every MLflow request
    (``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD`` or ``MLFLOW_TRACKING_TOKEN``). Other URIs (a SQLite
    file, a folder) are not checked.
    """
    if urlsplit(uri).scheme not in ("http", "https"):
        return
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    where = f"[tracking] uri={redact_uri(uri)}"
    todo = (
        "start it (mlflow/serve, see mlflow/README.md) or point tracking.uri / MLFLOW_TRACKING_URI "
        "at a running server"
    )
    endpoint = "/api/2.0/mlflow/experiments/search"
    timeouts = (connect_timeout, read_timeout)
    try:
        response = http_request(
            get_default_host_creds(uri),
            endpoint,
            "GET",
            max_retries=0,
            backoff_factor=0,
            timeout=timeouts,
            raise_on_status=False,
            params={"max_results": 1},
        )
    except MlflowException as exc:
        raise TrackingServerError(
            f"{where}: the MLflow tracking server does not answer: {_connection_failure(exc, timeouts)}; "
            f"every dcv stage logs there, so nothing was started; {todo}"
        ) from None
    if response.status_code in (401, 403):
        who = os.environ.get("MLFLOW_TRACKING_USERNAME")
        sent = (
            f"user {who!r}"
            if who
            else "a token"
            if os.environ.get("MLFLOW_TRACKING_TOKEN")
            else "no credentials"
        )
        raise TrackingServerError(
            f"{where}: the tracking server refused the request (HTTP {response.status_code}, {sent}); "
            "it needs a user allowed to log runs; export MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (never put them in the config or the URI)"
        )
    if response.status_code != 200:
        raise TrackingServerError(
            f"{where}: GET {endpoint} answered HTTP {response.status_code}; that is not a working MLflow "
            f"tracking server; {todo}"
        )
