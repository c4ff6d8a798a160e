"""The tracking server script (mlflow/serve) run for real: runs and proxied artifacts over HTTP, basic auth,
`dcv train` failing fast when the server is down, and no secret in anything a run records.

The session's server (tests/conftest.py `tracking_server`: starting one takes 15-40 s on 2 cores, so the fault
suite shares it), with basic auth on: the tests that log send the admin credentials, as a job on the cluster
does.
"""

from __future__ import annotations

import base64
import socket
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from dcv import tracking
from dcv.cli import main
from dcv.config import parse_config
from tests.helpers import MLFLOW_ADMIN as ADMIN
from tests.helpers import MLFLOW_PASSWORD as PASSWORD
from tests.helpers import free_port, tiny_config_dict

SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"


@pytest.fixture
def credentials(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def get_status(url: str, user: str | None = None, password: str | None = None) -> int:
    request = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.e2e
def test_runs_and_artifacts_go_through_the_server(tracking_server, credentials, tmp_path, monkeypatch):
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    monkeypatch.chdir(client_dir)  # where MLflow would put a local ./mlruns or ./mlartifacts
    raw = tiny_config_dict(tmp_path / "storage")
    raw["tracking"] = {"uri": tracking_server.uri, "experiment_name": "served"}
    cfg = parse_config(raw)
    tracking.check_tracking_server(tracking_server.uri)
    note = tmp_path / "note.txt"
    note.write_text("logged through the proxy\n")
    with tracking.child_run(cfg, "served-child", tags={"dcv.stage": "test"}) as run:
        run.log_params({"trial.seed": 3})
        run.log_metrics({"target/accuracy": 0.25}, step=2)
        run.log_artifact(note, artifact_path="notes")

    client = MlflowClient(tracking_server.uri)
    experiment = client.get_experiment_by_name("served")
    # The server hands out its proxy URI: clients never write to the artifact store directly.
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"tiny-test", "served-child"}
    child = runs["served-child"]
    assert child.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == runs["tiny-test"].info.run_id
    assert child.data.params["trial.seed"] == "3"
    assert child.data.params["model.name"] == "tiny"
    history = client.get_metric_history(run.run_id, "target/accuracy")
    assert [(m.step, m.value) for m in history] == [(2, 0.25)]
    assert [a.path for a in client.list_artifacts(run.run_id, "notes")] == ["notes/note.txt"]

    landed = list((tracking_server.data / "artifacts").rglob(f"{run.run_id}/artifacts/notes/note.txt"))
    assert [p.read_text() for p in landed] == ["logged through the proxy\n"]
    assert sorted(p.name for p in client_dir.iterdir()) == []  # no mlruns/, mlartifacts/ or mlflow.db here
    assert not (tmp_path / "storage").exists()  # a tracking server needs no local storage folder


@pytest.mark.e2e
def test_basic_auth_refuses_requests_without_valid_credentials(tracking_server, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    url = tracking_server.uri + SEARCH
    assert get_status(url) == 401
    assert get_status(url, ADMIN, "not-the-password") == 401
    assert get_status(url, ADMIN, PASSWORD) == 200
    assert (
        get_status(tracking_server.uri + "/health") == 200
    )  # unauthenticated, for load balancers and readiness

    no_credentials = r"refused the request \(HTTP 401, no credentials\)"
    with pytest.raises(tracking.TrackingServerError, match=no_credentials):
        tracking.check_tracking_server(tracking_server.uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password-marker")
    with pytest.raises(tracking.TrackingServerError, match="MLFLOW_TRACKING_PASSWORD") as refused:
        tracking.check_tracking_server(tracking_server.uri)
    assert f"[tracking] uri={tracking_server.uri}" in str(refused.value)
    assert "wrong-password-marker" not in str(refused.value)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    tracking.check_tracking_server(tracking_server.uri)


@pytest.mark.e2e
def test_server_listens_on_loopback_only(tracking_server):
    # The machine's own outward address (no packet is sent for a UDP connect).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
            address = s.getsockname()[0]
        except OSError:
            pytest.skip("this machine has no non-loopback IPv4 address")
    if address.startswith("127."):
        pytest.skip("this machine has no non-loopback IPv4 address")
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection((address, tracking_server.port), timeout=5),
    ):
        pass


def record_request_retries(monkeypatch) -> list:
    """The retries each MLflow HTTP request of this process is allowed, in order (None: MLflow's default)."""
    from mlflow.utils import rest_utils

    seen = []
    real = rest_utils.http_request

    def recorded(*args, **kwargs):
        seen.append(kwargs.get("max_retries"))
        return real(*args, **kwargs)

    monkeypatch.setattr(rest_utils, "http_request", recorded)
    return seen


def test_train_with_the_server_down_fails_fast_and_writes_nothing(tmp_path, monkeypatch, capsys):
    import ray

    ray_was_up = ray.is_initialized()
    port = free_port()  # nothing listens there
    storage = tmp_path / "storage"
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(storage)))
    # Credentials inside the URI (from the environment, where the config's check does not reach) must not
    # be echoed back.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://someone:uri-secret-marker@127.0.0.1:{port}")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    retries = record_request_retries(monkeypatch)
    code = main(["train", str(config), "--method", "sft"])
    err = capsys.readouterr().err
    assert code != 0
    # Fast: one request, without MLflow's retries (7 by default, about 4 minutes of backoff).
    assert retries == [0]
    assert f"[tracking] uri=http://***@127.0.0.1:{port}: the MLflow tracking server does not answer" in err
    assert "Connection refused" in err and "mlflow/serve" in err
    assert "uri-secret-marker" not in err
    assert not storage.exists()  # no trial folder, no database, nothing
    assert ray.is_initialized() == ray_was_up  # Ray was not started

    # The same through the config's tracking.uri.
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    raw = tiny_config_dict(storage)
    raw["tracking"]["uri"] = f"http://127.0.0.1:{port}"
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", str(config), "--method", "rl"]) != 0
    assert f"[tracking] uri=http://127.0.0.1:{port}: the MLflow" in capsys.readouterr().err
    assert not storage.exists()


def test_redact_uri():
    assert tracking.redact_uri("https://u:p@mlflow.example:5000/x") == "https://***@mlflow.example:5000/x"
    assert tracking.redact_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    tracking.check_tracking_server("sqlite:////nonexistent/mlflow.db")  # not a server: not checked


def all_artifact_text(client: MlflowClient, run_id: str, dest: Path, path: str | None = None) -> str:
    text = ""
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            text += all_artifact_text(client, run_id, dest, item.path)
        else:
            local = client.download_artifacts(run_id, item.path, str(dest))
            text += Path(local).read_bytes().decode(errors="replace")
    return text


@pytest.mark.e2e
def test_no_secret_in_what_a_run_records(tracking_server, credentials, tmp_path, monkeypatch, capsys):
    """A trial's logging (config params on the parent and child runs, tags, metrics, an artifact) with the
    tracking password and a Ray token in the environment: neither shows up anywhere."""
    ray_token = f"ray-token-{uuid.uuid4().hex}"
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_token)
    monkeypatch.chdir(tmp_path)
    raw = tiny_config_dict(tmp_path / "storage")
    raw["tracking"] = {"uri": tracking_server.uri, "experiment_name": "secrets"}
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    cfg = parse_config(raw)
    tracking.check_tracking_server(tracking_server.uri)
    tags = {"dcv.stage": "train", "dcv.method": "sft"}
    run = tracking.get_or_create_child_run(cfg, "sft-lr1e-05-seed0", tags=tags)
    run.log_params({"trial.method": "sft", "trial.seed": 0})
    run.log_metrics({"train/loss": 1.5, "target/accuracy": 0.125}, step=1)
    run.log_artifact(config, artifact_path="config")
    run.finish()
    printed = capsys.readouterr()

    client = MlflowClient(tracking_server.uri)
    experiment = client.get_experiment_by_name("secrets")
    runs = client.search_runs([experiment.experiment_id])
    assert {r.info.run_name for r in runs} == {"tiny-test", "sft-lr1e-05-seed0"}
    artifacts = "".join(all_artifact_text(client, r.info.run_id, tmp_path / r.info.run_id) for r in runs)
    assert "experiment_name: secrets" in artifacts  # the config file was read back through the proxy
    recorded = [printed.out, printed.err, tracking_server.log.read_text(), str(experiment.tags), artifacts]
    for r in runs:
        recorded += [r.info.run_name, str(r.data.params), str(r.data.tags), str(list(r.data.metrics))]
    assert len(next(r for r in runs if r.info.run_name == "tiny-test").data.params) > 50  # the whole config
    for secret in (PASSWORD, ray_token):
        assert not [text for text in recorded if secret in text]
