"""dcv on two Ray nodes, as a cluster runs it: `ray job submit` of the paper config at toy size to a head
with a storage root both nodes see (the NFS case), then `dcv run` on nodes that share no disk.

Both nodes run on this machine; the second runs in a mount namespace of its own (``unshare --mount``, as
root) with a private tmpfs over /tmp. Everything a test writes lives under /tmp (its folders, the
node-local model cache ``DCV_CACHE_DIR``, each node's Ray session folder), so a file one node writes there
is absent on the other: a stage that wrote a file on one node and read it on the other would fail. The
head declares no CPUs, so everything that asks for a CPU runs on the second node: Tune's trial drivers,
the Ray Train workers, the rollout actors and the actors of the benchmarks, patching and circuits stages.
The driver (``dcv run``, or the job's entrypoint: the base snapshot, the analysis, the report) runs beside
the head. Ray's state API says which node ran what.

What is shared, as on a cluster: the network (loopback: the S3 server, the tracking server, Ray's ports)
and the code and its interpreter (/work, not hidden). For the NFS case the storage root (and the job's
data folder) is a folder under /var/tmp, which both namespaces see. One head and one second node serve
every test of this module (about 40 s to start).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from dcv.cli import main
from dcv.config import apply_overrides, parse_config
from dcv.experiment import STAGES
from dcv.results import KEY_COLUMNS, read_results
from dcv.storage import (
    WEIGHT_CHANGE_FILE,
    analysis_dir,
    calibration_dir,
    checkpoint_model,
    circuits_dir,
    model_folder_problem,
    patching_dir,
    storage_path,
    trials_dir,
    weight_change_dir,
)
from dcv.training.sweep import plan_trials
from tests.helpers import (
    PAPER_CONFIG,
    REPO,
    S3_SETTINGS,
    DcvRun,
    agent_ports,
    fault_env,
    free_port,
    paper_toy_overrides,
    start_ray_head,
    stop_process_tree,
    stop_ray_head,
    tiny_run_config_dict,
    write_sciknoweval_layout,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.ray,
]  # a Ray head and a second node of its own, a job, two `dcv run`

RAY = str(Path(sys.executable).with_name("ray"))
# The actors that must run on the second node (Ray's class names): the trial workers, the rollout actors
# and the stage actors (Ray Data's map workers around dcv.stages.StageWorker).
PLACED = ("RayTrainWorker", "RolloutActor", "MapWorker(MapBatches(StageWorker))")
# Inside `unshare --mount`: a fresh tmpfs over /tmp, then the command that follows.
PRIVATE_TMP = ("sh", "-c", 'mount -t tmpfs tmpfs /tmp && exec "$@"', "sh")


@dataclass(frozen=True)
class TwoNodes:
    gcs: str  # RAY_ADDRESS of the head
    dashboard: str  # the state API's and the job server's address
    env: dict[str, str]  # the token, the S3 settings and the tracking server's credentials
    worker_node: str  # the second node's id


@pytest.fixture(scope="module")
def two_nodes(s3_server, tracking_server, tmp_path_factory):
    """A head with no CPUs (its own temp dir under /tmp) and a second node with 4 CPUs behind a private
    /tmp; token auth on both; the head's job agent up. Every node has the S3 settings (the session's
    server; each test makes its own bucket) and the tracking server's credentials in its environment, as
    cluster.yaml's nodes have (~/.dcv/cluster.env, secrets.env). Stopped (these nodes only) when the module
    ends."""
    private = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", *PRIVATE_TMP, "true"], capture_output=True
    )
    assert private.returncode == 0, f"this test needs root and mount namespaces: {private.stderr.decode()}"
    logs = tmp_path_factory.mktemp("two-nodes")
    temp_dir = Path("/tmp") / f"dcv-ray-{uuid.uuid4().hex[:8]}"  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex, DCV_CACHE_DIR=str(logs / "cache"))
    env.update(S3_SETTINGS, AWS_ENDPOINT_URL=s3_server)
    env.update(tracking_server.credentials)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # a job's `python` is this venv's
    gcs_port, dashboard_port = free_port(), free_port()
    start_ray_head(temp_dir, env, num_cpus=0, gcs_port=gcs_port, dashboard_port=dashboard_port)
    worker = subprocess.Popen(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            *PRIVATE_TMP,
            RAY,
            "start",
            f"--address=127.0.0.1:{gcs_port}",
            "--node-ip-address=127.0.0.1",
            *agent_ports(),
            "--min-worker-port=23000",  # another range than the head's workers
            "--max-worker-port=23999",
            "--num-cpus=4",
            "--disable-usage-stats",
            "--block",
        ],
        env=env,
        cwd="/",
        stdout=(logs / "worker-node.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    try:
        worker_node = wait_for_worker_node(dashboard, env)
        wait_for_job_agent(dashboard, env)
        yield TwoNodes(f"127.0.0.1:{gcs_port}", dashboard, env, worker_node)
    finally:
        stop_process_tree(worker.pid)
        stop_ray_head(temp_dir)


def wait_for_job_agent(address: str, env: dict[str, str], timeout_s: float = 180) -> None:
    """Until the head's job agent has registered, a submission fails with "No available agent"."""
    deadline = time.monotonic() + timeout_s
    while True:
        probe = subprocess.run(
            [RAY, "job", "submit", "--address", address, "--", "python", "-c", "pass"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if probe.returncode == 0:
            return
        assert "No available agent" in probe.stderr, probe.stderr[-3000:]
        assert time.monotonic() < deadline, "the Ray head's job agent never came up"
        time.sleep(1)


# Ray's state API, asked from a process of its own: Ray reads the auth mode and the token once per process,
# and this one's Ray (the session's, if a test started it) has none.
STATE = """
import json, sys
from ray.util.state import list_actors, list_nodes
nodes = [{"id": n.node_id, "head": n.is_head_node, "state": n.state} for n in list_nodes(address=sys.argv[1])]
actors = [
    {"class": a.class_name, "node": a.node_id}
    for a in list_actors(address=sys.argv[1], limit=10_000, raise_on_missing_output=False)
]
print(json.dumps({"nodes": nodes, "actors": actors}))
"""


def cluster_state(dashboard: str, env: dict[str, str]) -> dict:
    """The cluster's nodes and actors (dead ones too) from Ray's state API."""
    asked = subprocess.run(
        [sys.executable, "-c", STATE, dashboard], env=env, capture_output=True, text=True, timeout=120
    )
    assert asked.returncode == 0, asked.stderr[-3000:]
    return json.loads(asked.stdout.strip().splitlines()[-1])


def wait_for_worker_node(dashboard: str, env: dict[str, str], timeout_s: float = 180) -> str:
    """The second node's id, once it has joined the head."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [n for n in cluster_state(dashboard, env)["nodes"] if n["state"] == "ALIVE" and not n["head"]]
        if alive:
            return alive[0]["id"]
        time.sleep(2)
    pytest.fail("the second Ray node never joined the head")


def start_run(nodes: TwoNodes, raw: dict, tmp_path: Path, name: str, attempt: str) -> DcvRun:
    """``dcv run`` of ``raw`` (config ``<name>.yaml``, working directory ``<name>-cwd``) on the cluster."""
    config, work = tmp_path / f"{name}.yaml", tmp_path / f"{name}-cwd"
    config.write_text(yaml.safe_dump(raw))
    work.mkdir(exist_ok=True)
    env = fault_env(**nodes.env, RAY_ADDRESS=nodes.gcs)
    return DcvRun(["run", str(config)], cwd=work, env=env, log=tmp_path / f"{name}-{attempt}.stderr")


def nodes_of(nodes: TwoNodes) -> dict[str, set[str]]:
    """For each PLACED class: the ids of the nodes its actors ran on (from Ray's state API)."""
    actors = cluster_state(nodes.dashboard, nodes.env)["actors"]
    return {name: {a["node"] for a in actors if a["class"] == name} for name in PLACED}


def test_job_submission_without_the_token_is_refused(two_nodes):
    address, env = two_nodes.dashboard, two_nodes.env
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    listed = subprocess.run(
        [RAY, "job", "list", "--address", address], env=no_token, capture_output=True, text=True, timeout=120
    )
    assert listed.returncode != 0
    assert "auth" in (listed.stdout + listed.stderr).lower()


def paper_toy_config(folder: Path) -> tuple[dict, Path]:
    """configs/qwen2.5-3b.yaml at toy size (tests/helpers.py ``paper_toy_overrides``: the paper's protocol,
    the tiny model) written to a file, as a user would submit it: the raw config and the file."""
    source = write_sciknoweval_layout(folder / "sciknoweval")
    storage = (folder / "store").resolve()
    raw = apply_overrides(yaml.safe_load(PAPER_CONFIG.read_text()), paper_toy_overrides(source, storage))
    config_file = folder / "paper-toy.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    return raw, config_file


def submit(address: str, env: dict[str, str], config_file: Path) -> str:
    submitted = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--"]
        + ["python", "ray_jobs/experiment.py", "--config", str(config_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output[-4000:]
    assert "succeeded" in output.lower()
    return output


@pytest.fixture
def shared_folder():
    """A folder both nodes see (/var/tmp is not behind the second node's private /tmp): the NFS case."""
    shared = Path("/var/tmp") / f"dcv-shared-{uuid.uuid4().hex[:8]}"
    shared.mkdir()
    yield shared
    shutil.rmtree(shared, ignore_errors=True)


def assert_rl_continues_from_sfts_last_checkpoint(
    checkpoints: pl.DataFrame, sft_name: str, rl_name: str
) -> None:
    """rl.init sft (the seed paper's protocol): the GRPO trial starts from the SFT trial's last checkpoint, so
    its step 0 holds the same weights and scores; SFT itself started from the base model and moved."""
    pairs = set(zip(checkpoints["trial"], checkpoints["step"], strict=True))
    assert pairs == {(name, step) for name in (sft_name, rl_name) for step in (0, 2)}
    sft, rl = (checkpoints.filter(pl.col("trial") == name).sort("step") for name in (sft_name, rl_name))
    started_from = f"sft:{sft_name}@2"
    assert (sft["init"] == "base").all() and (rl["init"] == started_from).all()
    assert sft["kl_to_base"][0] == pytest.approx(0.0, abs=1e-6) and sft["kl_to_base"][1] > 0
    start, last_sft = (
        load_file(Path(p) / "model.safetensors") for p in (rl["checkpoint"][0], sft["checkpoint"][1])
    )
    assert start.keys() == last_sft.keys() and all(torch.equal(start[k], last_sft[k]) for k in start)
    assert rl["kl_to_base"][0] == pytest.approx(sft["kl_to_base"][1], rel=1e-5)
    assert rl["target/accuracy"][0] == sft["target/accuracy"][1]
    assert rl.filter(pl.col("step") > 0)["train/reward"].is_not_null().all()
    assert checkpoint_model(rl_name, 0, started_from) == f"{sft_name}@2"  # patched once, as SFT's model


def test_experiment_submitted_as_a_ray_job(two_nodes, shared_folder, capsys):
    """The paper config at toy size (rl.init sft, Dr. GRPO, exact + attribution + masks + cmap, the chem
    probe, benchmarks, calibration, weight change, FSDP) through `ray job submit`, on the two nodes with its
    storage root (MLflow in SQLite under it, written by the driver and the trial workers alike) and its
    data folder on a path both see: every stage's table, every actor on the second node, the GRPO trial
    started from the SFT trial's last checkpoint (same weights, same scores, its MLflow run saying so);
    `dcv report` rebuilds the report from the stored tables. (That a rerun trains and patches nothing
    again is the fault chain's, tests/faults/test_killed_run.py: one submission here.)"""
    raw, config_file = paper_toy_config(shared_folder)
    storage = Path(raw["storage"]["root"])
    output = submit(two_nodes.dashboard, two_nodes.env, config_file)
    ran = nodes_of(two_nodes)
    assert all(ran[name] == {two_nodes.worker_node} for name in PLACED), ran
    for stage in STAGES:
        assert f"{stage}] done in" in output
    assert "mlflow ui --backend-store-uri sqlite:///" in output

    checkpoints = read_results(storage)
    assert set(checkpoints["method"]) == {"sft", "rl"}
    assert list(checkpoints.columns[: len(KEY_COLUMNS)]) == list(KEY_COLUMNS)
    sft_name, rl_name = (spec.name for spec in plan_trials(parse_config(raw)))
    assert_rl_continues_from_sfts_last_checkpoint(checkpoints, sft_name, rl_name)
    assert json.loads(next((storage / "trials").rglob("config.json")).read_text())["model_type"] == "qwen2"
    effects = pl.read_parquet(patching_dir(storage) / "effects.parquet")
    assert set(effects["method"]) == {"exact", "attribution", "mask"}
    assert "chem" in set(effects["probe"]) and effects["effect"].is_finite().all()
    cmap = pl.read_parquet(patching_dir(storage) / "cmap.parquet")  # cross-model patching, checkpoints only
    assert set(cmap["direction"]) == {"ckpt_into_base", "base_into_ckpt"} and "base" not in set(cmap["model"])
    assert cmap["effect"].is_finite().all()
    assert not pl.read_parquet(analysis_dir(storage) / "cmap.parquet").is_empty()
    circuits = pl.read_parquet(circuits_dir(storage) / "circuits.parquet")
    assert "mask" in set(circuits["method"])
    curves = pl.read_parquet(circuits_dir(storage) / "faithfulness_curves.parquet")  # ranking methods only
    assert set(curves["method"]) == {"exact", "attribution"} and curves["faithfulness"].is_finite().all()
    assert not pl.read_parquet(analysis_dir(storage) / "faithfulness_areas.parquet").is_empty()
    assert any(calibration_dir(storage).rglob("*.parquet"))
    changed = pl.read_parquet(weight_change_dir(storage) / WEIGHT_CHANGE_FILE)
    assert changed.height == 2 * 8 * checkpoints.filter(pl.col("step") > 0).height  # layers x heads each

    report = storage / "report"
    text = (report / "report.md").read_text()
    assert "## The answer: SFT vs RL" in text
    # One run per method: no level can be matched, so no verdict and no DCV heatmap.
    assert "Insufficient runs" in text.split("## ")[1] and "higher under SFT" not in text
    page = (report / "report.html").read_text()
    figures = sorted(p.name for p in (report / "figures").glob("*.png"))
    assert {"adaptation.png", "forgetting.png", "pareto.png", "preservation.png"} <= set(figures)
    assert not any(name.startswith("dcv_") for name in figures)
    assert page.count("data:image/png;base64,") == len(figures)
    summary = pl.read_parquet(storage / "analysis" / "summary.parquet")
    # One row per evaluated checkpoint and patching method.
    assert summary.height == checkpoints.height * summary["patching"].n_unique()
    # lm-eval scored every model once; each checkpoint's row carries its model's score.
    assert checkpoints["bench/dcv_winogrande/acc"].is_between(0, 1).all()
    assert summary["forgetting_bench"].is_not_null().all()
    scored = list((storage / "benchmarks" / "models").glob("*.parquet"))
    assert len(scored) == 1 + 1 + 1  # base + step 2 of each trial
    noise_floor = pl.read_parquet(storage / "analysis" / "noise_floor.parquet")
    base = pl.read_parquet(storage / "analysis" / "base_circuits.parquet")
    # The ranking methods' floor: one bootstrap row per method and probe the base model does with a base
    # circuit (a random tiny model may do none); the masks' floor (relearned masks) comes from the circuits
    # stage.
    pairs = ("probe", "method")
    computed = noise_floor.filter(pl.col("method") != "mask")
    does = base.filter((pl.col("method") != "mask") & pl.col("competent") & (pl.col("size") > 0))
    assert sorted(computed.select(pairs).rows()) == sorted(does.select(pairs).rows())
    assert noise_floor.filter(pl.col("method") == "mask").height > 0
    assert noise_floor["jaccard"].is_between(0, 1).all()

    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(raw["tracking"]["experiment_name"])
    runs = client.search_runs([experiment.experiment_id])
    stages = sorted(r.data.tags.get("dcv.stage", "parent") for r in runs)
    assert stages == ["parent", "patch", "train", "train", "weight_change"]
    trained = [r for r in runs if r.data.tags.get("dcv.stage") == "train"]
    assert all("bench/dcv_winogrande/acc" in r.data.metrics for r in trained)
    assert all(r.info.status == "FINISHED" for r in trained)
    rl_run = next(r for r in trained if r.data.tags["dcv.method"] == "rl")
    assert rl_run.data.params["trial.init"] == f"sft:{sft_name}@2"
    parent = next(r for r in runs if "dcv.stage" not in r.data.tags)
    assert {r.data.tags["mlflow.parentRunId"] for r in trained} == {parent.info.run_id}
    results = {a.path for a in client.list_artifacts(parent.info.run_id, "results")}
    assert results == {"results/checkpoints.parquet", "results/checkpoints.csv"}
    # The parent run ends FINISHED with the report's answer and the primary endpoint's verdict (one run per
    # method here: not compared, so no primary metrics and no answer table); no metric per headline cell.
    assert parent.info.status == "FINISHED" and parent.data.tags["dcv.answer"]
    assert parent.data.tags["dcv.verdict"] == "not compared (insufficient runs)"
    assert not any(k.startswith(("headline/", "primary/")) for k in parent.data.metrics)
    logged = [a.path for a in client.list_artifacts(parent.info.run_id, "report")]
    assert "report/report.html" in logged and "report/report.md" in logged

    # `dcv report` rebuilds the analysis and the report from the stored tables: no model is loaded,
    # nothing is trained, patched or searched again, and the same tables come out.
    analysis = {p: pl.read_parquet(p) for p in (storage / "analysis").glob("*.parquet")}
    circuit_files = {p: p.stat().st_mtime_ns for p in (storage / "circuits").rglob("*.parquet")}
    items = {p: p.stat().st_mtime_ns for p in (storage / "patching" / "items").glob("*.parquet")}
    (report / "report.md").unlink()
    assert main(["report", str(storage)]) == 0
    assert (report / "report.md").is_file() and "Insufficient runs" in capsys.readouterr().out
    assert all(pl.read_parquet(p).equals(table) for p, table in analysis.items())
    assert {p: p.stat().st_mtime_ns for p in circuit_files} == circuit_files
    assert {p: p.stat().st_mtime_ns for p in items} == items


def test_dcv_run_on_nodes_that_share_no_disk_resumes_after_a_kill(
    two_nodes, s3_root, tracking_server, tmp_path
):
    """No shared disk: the root on S3, the tracking server over HTTP. The run is killed (SIGKILL) once
    its SFT trial has finished and run again: the rerun takes over the dead run's lease at once, does not
    train the finished trial again, and ends with every table, checkpoint and the report on S3, nothing
    under its working directory but its log, and the artifacts on the tracking server."""
    raw = tiny_run_config_dict(tmp_path / "unused", tracking_uri=tracking_server.uri)
    raw["storage"] = {"root": s3_root}
    raw["tracking"]["experiment_name"] = f"two-nodes-{uuid.uuid4().hex[:8]}"
    root = storage_path(s3_root)
    sft, rl = (spec.name for spec in plan_trials(parse_config(raw)))
    first = start_run(two_nodes, raw, tmp_path, "s3", "first")
    first.wait_for((trials_dir(root) / sft / "trial.json").is_file, 1200, f"trial {sft} finished")
    first.kill()
    assert not (trials_dir(root) / rl / "trial.json").exists()
    second = start_run(two_nodes, raw, tmp_path, "s3", "second")
    assert second.finish(1800) == 0, second.output()
    assert f"taking over the lock of pid {first.proc.pid} on " in second.stderr, second.output()  # a warning
    assert second.saw("sweep: 2 trials, 1 finished before (skipped), 1 to train"), second.output()

    ran = nodes_of(two_nodes)
    assert all(ran[name] == {two_nodes.worker_node} for name in PLACED), ran
    results = read_results(root)
    assert sorted(set(results["trial"])) == sorted([sft, rl])
    for checkpoint in results["checkpoint"]:  # Ray Train persisted them on S3; each a loadable model
        assert checkpoint.startswith(f"{s3_root}/trials/") and model_folder_problem(checkpoint) is None
    analysis = sorted(p.name for p in analysis_dir(root).glob("*.parquet"))
    assert "headline.parquet" in analysis and "checkpoints.parquet" in analysis, analysis
    assert (root / "report" / "report.html").is_file()
    assert [p.name for p in (tmp_path / "s3-cwd").iterdir()] == ["dcv-logs"]  # no folder named "s3:"
    served = {p.name for p in (tracking_server.data / "artifacts").rglob("*.parquet")}
    assert {"headline.parquet", "checkpoints.parquet"} <= served, served
