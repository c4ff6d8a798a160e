"""`dcv run` on two Ray nodes that share no disk, then on two that share one path (the NFS case).

Both nodes run on this machine; the second runs in a mount namespace of its own (``unshare --mount``, as
root) with a private tmpfs over /tmp. Everything a test writes lives under /tmp (its folders, the
node-local model cache ``DCV_CACHE_DIR``, each node's Ray session folder), so a file one node writes there
is absent on the other: a stage that wrote a file on one node and read it on the other would fail. The
head declares no CPUs, so everything that asks for a CPU runs on the second node: Tune's trial drivers,
the Ray Train workers, the rollout actors and the actors of the benchmarks, patching and circuits stages.
The driver (``dcv run``: the base snapshot, the analysis, the report) runs beside the head. Ray's state
API says which node ran what.

What is shared, as on a cluster: the network (loopback: the S3 server, the tracking server, Ray's ports)
and the code and its interpreter (/work, not hidden). For the NFS case the storage root is a folder
under /var/tmp, which both namespaces see.
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

import pytest
import yaml

from dcv.config import parse_config
from dcv.results import read_results
from dcv.storage import analysis_dir, model_folder_problem, storage_path, trials_dir
from dcv.training.sweep import plan_trials
from tests.helpers import (
    DcvRun,
    agent_ports,
    fault_env,
    free_port,
    start_ray_head,
    stop_process_tree,
    stop_ray_head,
    tiny_run_config_dict,
)

pytestmark = [pytest.mark.e2e, pytest.mark.ray]  # a Ray head and a second node of its own, two `dcv run`

RAY = str(Path(sys.executable).with_name("ray"))
# The actors that must run on the second node (Ray's class names): the trial workers, the rollout actors
# and the stage actors (Ray Data's map workers around dcv.stages.StageWorker).
PLACED = ("RayTrainWorker", "RolloutActor", "MapWorker(MapBatches(StageWorker))")
# Inside `unshare --mount`: a fresh tmpfs over /tmp, then the command that follows.
PRIVATE_TMP = ("sh", "-c", 'mount -t tmpfs tmpfs /tmp && exec "$@"', "sh")


@dataclass(frozen=True)
class TwoNodes:
    gcs: str  # RAY_ADDRESS of the head
    dashboard: str  # the state API's address
    env: dict[str, str]  # the token and the S3 settings: every process of the test has them
    worker_node: str  # the second node's id


@pytest.fixture
def two_nodes(s3_root, tracking_server, tmp_path):
    """A head with no CPUs (its own temp dir under /tmp) and a second node with 4 CPUs behind a private
    /tmp; token auth on both. Every node has the S3 settings and the tracking server's credentials in
    its environment, as cluster.yaml's nodes have (~/.dcv/cluster.env, secrets.env). Stopped (these nodes
    only) when the test ends."""
    private = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", *PRIVATE_TMP, "true"], capture_output=True
    )
    assert private.returncode == 0, f"this test needs root and mount namespaces: {private.stderr.decode()}"
    temp_dir = Path("/tmp") / f"dcv-ray-{uuid.uuid4().hex[:8]}"  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex, DCV_CACHE_DIR=str(tmp_path / "cache"))
    env.update(tracking_server.credentials)
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
        stdout=(tmp_path / "worker-node.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    try:
        yield TwoNodes(f"127.0.0.1:{gcs_port}", dashboard, env, wait_for_worker_node(dashboard, env))
    finally:
        stop_process_tree(worker.pid)
        stop_ray_head(temp_dir)


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


def test_dcv_run_on_nodes_that_share_no_disk_resumes_after_a_kill_then_on_nodes_sharing_the_root(
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

    # The NFS case: one folder both nodes see (/var/tmp is not behind the second node's private /tmp),
    # MLflow in SQLite under it (the default), written by the driver and the trial workers alike.
    shared = Path("/var/tmp") / f"dcv-shared-{uuid.uuid4().hex[:8]}"
    try:
        run = start_run(two_nodes, tiny_run_config_dict(shared / "store"), tmp_path, "shared", "only")
        assert run.finish(1800) == 0, run.output()
        assert sorted(set(read_results(shared / "store")["trial"])) == sorted([sft, rl])
        assert (analysis_dir(shared / "store") / "headline.parquet").is_file()
        ran = nodes_of(two_nodes)
        assert all(ran[name] == {two_nodes.worker_node} for name in PLACED), ran
    finally:
        shutil.rmtree(shared, ignore_errors=True)
