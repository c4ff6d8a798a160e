"""Shared fixtures. Models are session-scoped and read-only: a test that changes weights copies them."""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path

import polars as pl
import psutil
import pytest
import yaml

from dcv.config import ExperimentConfig, ModelConfig, load_config
from dcv.results import build_results_table

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"


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
    """The real SmolLM2-135M-Instruct and its tokenizer (tests using it are marked slow)."""
    from dcv.models import load_model_and_tokenizer

    return load_model_and_tokenizer(ModelConfig(name="smollm2-135m-instruct"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for servers a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_config_dict(storage: Path) -> dict:
    """The demo config shrunk to the tiny model and a few items, stored under ``storage``."""
    raw = yaml.safe_load(DEMO_CONFIG.read_text())
    raw["name"] = "tiny-test"
    raw["model"] = {"name": "tiny"}
    raw["target_task"].update(n_train=16, n_test=8)
    # The demo's schedule, pinned: tests name trials by learning rate and count checkpoints.
    raw["sft"].update(learning_rate=3e-5, max_steps=4, eval_every=4)
    raw["rl"].update(learning_rate=3e-6, max_steps=4, eval_every=4)
    raw["sweep"].update(sft_learning_rates=[3e-5], rl_learning_rates=[3e-6])
    # A random tiny model does no probe: there is nothing to plant damage in (tests/test_calibration.py
    # plants heads that do carry a behaviour).
    raw["calibration"] = {"enabled": False}
    raw["probes"] = [
        {"name": name, "n_items": 8, "seed": 0} for name in ("ioi", "capitals", "greater_than", "induction")
    ]
    raw["evaluation"].update(batch_size=8, max_new_tokens=8, kl_prompts=4, kl_max_new_tokens=8)
    raw["storage"] = {"root": str(storage)}
    raw["tracking"] = {"experiment_name": "tiny-test"}
    raw.pop("benchmarks", None)  # lm-eval runs only where a test asks for it
    return raw


def results_of(checkpoints: dict[tuple[str, int], Path]) -> pl.DataFrame:
    """A results table of {(trial, step): HF folder}, method from the trial name, all from "base"."""
    return build_results_table(
        {
            "trial": trial,
            "method": trial.split("-")[0],
            "learning_rate": 1e-5,
            "seed": 0,
            "init": "base",
            "step": step,
            "checkpoint": str(path),
            "metrics": {"target/accuracy": 0.5},
        }
        for (trial, step), path in checkpoints.items()
    )


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
    import os

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


def wait_for_no_processes(marker: str, value: str, seconds: float) -> None:
    """Wait until no process carries ``marker=value``; then SIGKILL what is left (the test started them)."""
    deadline = time.monotonic() + seconds
    while True:
        ours = []
        for process in psutil.process_iter(["pid"]):
            try:
                if process.environ().get(marker) == value:
                    ours.append(process)
            except psutil.Error:
                continue
        if not ours:
            return
        if time.monotonic() > deadline:
            for process in ours:
                process.kill()
            psutil.wait_procs(ours, timeout=10)
            return
        time.sleep(0.1)
