"""Shared fixtures, and the cost markers that follow from them. Models are session-scoped and read-only: a
test that changes weights copies them."""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from dcv.config import ExperimentConfig, ModelConfig, load_config
from tests.helpers import (
    S3_SETTINGS,
    DcvRun,
    TrackingServer,
    fault_env,
    tiny_config_dict,
    tiny_run_config_dict,
)

# One intra-op thread in this process and in every process it starts (`dcv`, `ray start`, their workers),
# unless OMP_NUM_THREADS is set. On 2 cores that other work also uses, torch's 2 OpenMP threads spin-wait
# for each other: under a load average of 5-7, tests/circuits/{test_mask,test_noise_floor,test_circuit}.py
# took 488 s with 2 threads and 16 s with 1, tests/test_smollm2.py 770 s and 29 s. The assertions do not
# depend on it (tolerances cover the order of float sums; runs compared exactly share this setting).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# A test that uses one of these fixtures, directly or through another fixture, gets the marker (pyproject.toml
# says what each means). Tests that start Ray, load SmolLM2 or run `dcv` by themselves are marked in place.
MARKED_BY_FIXTURE = {"ray_cluster": ("ray",), "smollm2": ("model",), "tiny_run": ("e2e", "ray")}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, markers in MARKED_BY_FIXTURE.items():
            if fixture in getattr(item, "fixturenames", ()):
                for marker in markers:
                    item.add_marker(marker)


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2 tokenizer (the tiny model shares it); converts the GGUF once per machine."""
    from dcv.models import load_tokenizer

    return load_tokenizer(ModelConfig(name="tiny"))


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    from dcv.models import load_model

    return load_model(ModelConfig(name="tiny"), tokenizer)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct and its tokenizer (tests using it are marked `model`)."""
    from dcv.models import load_model_and_tokenizer

    return load_model_and_tokenizer(ModelConfig(name="smollm2-135m-instruct"))


@pytest.fixture
def tiny_config_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tmp_path / "storage")))
    return path


@pytest.fixture
def tiny_config(tiny_config_file: Path) -> ExperimentConfig:
    return load_config(tiny_config_file)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session, on loopback; yields its marker; shut down even when tests fail."""
    import ray

    from dcv.training.trial import runtime_env_vars

    # A marker in every worker's environment, so a test can tell this session's Ray processes from others'.
    session = uuid.uuid4().hex
    env_vars = {**runtime_env_vars(dict(os.environ)), "DCV_TEST_RAY_SESSION": session}
    # address="local": a new Ray of our own, never a cluster that a `ray start` left on this machine.
    ray.init(
        address="local",
        num_cpus=4,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        runtime_env={"env_vars": env_vars},
    )
    yield session
    ray.shutdown()


@dataclass(frozen=True)
class TinyRun:
    config: Path
    storage: Path
    run: DcvRun  # finished: its console (stdout), stderr and exit code


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    """One uninterrupted `dcv run` of tiny_run_config_dict (MLflow in SQLite under its root), for the tests
    that only read what it printed and wrote: the console test and the fault suite's comparison. Read-only:
    a test that would change its files copies them. It does not assert success; each reader does."""
    root = tmp_path_factory.mktemp("tiny-run")
    storage = (root / "store").resolve()
    config = root / "tiny-run.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config_dict(storage)))
    run = DcvRun(["run", str(config)], cwd=root, env=fault_env(), log=root / "run.stderr")
    run.finish(1200)
    return TinyRun(config, storage, run)


@pytest.fixture(scope="session")
def _tracking_server(tmp_path_factory):
    server = TrackingServer(tmp_path_factory.mktemp("tracking-server"), auth=True)
    try:
        server.start()  # 15-40 s on 2 cores: one server for the session
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def tracking_server(_tracking_server) -> TrackingServer:
    """The session's real tracking server (mlflow/serve on loopback, basic auth on); running when a module
    starts, even if an earlier module killed it and failed before starting it again."""
    if not _tracking_server.running():
        _tracking_server.start()
    return _tracking_server


@pytest.fixture(scope="session")
def s3_server() -> str:
    """A real S3 API on 127.0.0.1 (moto's server mode, as Ray's own storage tests use): its endpoint URL.
    Started once per session in a thread of this process (about 1 s)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_root(s3_server, monkeypatch) -> str:
    """``s3://<a new bucket>/run`` on the session's S3 server, with the endpoint, region and (fake)
    credentials in this process's environment, where dcv.object_store reads them and subprocesses
    inherit them."""
    import boto3

    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    for name, value in S3_SETTINGS.items():
        monkeypatch.setenv(name, value)
    bucket = f"dcv-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_server, region_name=S3_SETTINGS["AWS_REGION"])
    client.create_bucket(Bucket=bucket)
    return f"s3://{bucket}/run"
