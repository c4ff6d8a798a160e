"""cluster.yaml against the Ray cluster launcher's own checks (no cloud is reached), its security choices,
and the local Ray that dcv starts: loopback only, token auth on."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import uuid

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from dcv.object_store import ObjectPath
from dcv.storage import storage_path
from tests.helpers import REPO

CLUSTER_YAML = REPO / "cluster.yaml"


def launcher_check(config: dict) -> dict:
    """What `ray up` does with the file before it talks to AWS: fill in the provider's defaults, then
    validate against ray/autoscaler/ray-schema.json and the launcher's cross-field rules."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_the_launchers_checks(cluster):
    prepared = launcher_check(cluster)
    assert prepared["provider"]["type"] == "aws"
    nodes = prepared["available_node_types"]
    assert nodes[prepared["head_node_type"]]["max_workers"] == 0
    gpu_types = {n: node["node_config"]["InstanceType"] for n, node in nodes.items() if n != "head.cpu"}
    assert sorted(gpu_types.values()) == ["p4d.24xlarge", "p5.48xlarge"]
    assert all(nodes[name]["min_workers"] == 0 for name in gpu_types)  # GPUs only while there is work
    assert sum(nodes[name]["max_workers"] for name in gpu_types) <= prepared["max_workers"]


def mutate(config: dict, path: str, value) -> dict:
    changed = copy.deepcopy(config)
    *parents, last = path.split(".")
    node = changed
    for key in parents:
        node = node[key]
    node[last] = value
    return changed


@pytest.mark.parametrize(
    ("path", "value", "error"),
    [
        ("dashboard_host", "0.0.0.0", jsonschema.ValidationError),  # unknown top-level key
        ("provider.security_group.OpenPorts", [8265], jsonschema.ValidationError),
        ("available_node_types.worker.h100x8.resources", {"GPU": -1}, jsonschema.ValidationError),
        ("max_workers", -1, jsonschema.ValidationError),
        ("head_node_type", "head.gpu", ValueError),  # not one of available_node_types
    ],
)
def test_a_broken_cluster_yaml_is_rejected(cluster, path, value, error):
    if path.startswith("available_node_types."):  # node type names contain dots
        node_type = ".".join(path.split(".")[1:3])
        broken = copy.deepcopy(cluster)
        broken["available_node_types"][node_type]["resources"] = value
    else:
        broken = mutate(cluster, path, value)
    with pytest.raises(error):
        launcher_check(broken)


def test_cluster_security_choices(cluster):
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "--dashboard-host=0.0.0.0" not in head_start
    # Ray's own security group rules only (intra-cluster + SSH): nothing opened on top.
    assert cluster["provider"]["security_group"]["IpPermissions"] == []
    setup = "\n".join(cluster["setup_commands"])
    assert "export RAY_AUTH_MODE=token" in setup
    assert all(". ~/.dcv/cluster.env" in c for c in cluster["worker_start_ray_commands"])
    assert all(". ~/.dcv/cluster.env" in c for c in cluster["head_start_ray_commands"])
    # The head makes the token without printing it; the autoscaler copies it to the workers.
    assert "ray get-auth-token --generate > /dev/null" in "\n".join(cluster["head_setup_commands"])
    assert "~/.ray/auth_token" in cluster["cluster_synced_files"]
    # Storage and tracking reach every job through the environment that `ray start` passes on.
    assert "export DCV_STORAGE_ROOT=s3://" in setup and "export MLFLOW_TRACKING_URI=http://" in setup
    # The root is an object store that dcv run takes (no disk shared by the nodes), in the cluster's region.
    root = re.search(r"export DCV_STORAGE_ROOT=(\S+)", setup).group(1)
    assert isinstance(storage_path(root), ObjectPath) and storage_path(root).scheme == "s3"
    assert f"export AWS_REGION={cluster['provider']['region']}" in setup
    assert "mlflow/serve --auth" in head_start
    # Every install of dcv[gpu...] takes constraints-gpu.txt's versions, torch's among them (one source).
    installs = [c for c in cluster["setup_commands"] + cluster["head_setup_commands"] if "-e ~/dcv'[gpu" in c]
    assert len(installs) == 2 and all("-c ~/dcv/constraints-gpu.txt -e ~/dcv'[gpu" in c for c in installs)
    assert "download.pytorch.org" not in setup
    pins = (REPO / "constraints-gpu.txt").read_text()
    assert re.search(r"^torch==2\.13\.0$", pins, re.M) and re.search(r"^vllm==0\.32\.0$", pins, re.M)
    # Passwords are only ever taken from variables, never written into the file.
    assigned = re.findall(r"PASSWORD=(\S+)", CLUSTER_YAML.read_text())
    assert assigned and all(value.startswith(("$", '"$', "%s")) for value in assigned), assigned


PROBE_LOCAL_RAY = """
import json, os, psutil, ray
from ray._raylet import AuthenticationMode, get_authentication_mode
from dcv.cli import init_ray
os.environ["RAY_AUTH_MODE"] = "disabled"
try:
    init_ray()
    refused = ""
except ValueError as exc:
    refused = str(exc)
del os.environ["RAY_AUTH_MODE"]
init_ray()
node = ray._private.worker.global_worker.node
servers = [info.process.pid for name in ("gcs_server", "raylet") for info in node.all_processes[name]]
listening = sorted({
    c.laddr.ip.removeprefix("::ffff:")
    for pid in servers
    for c in psutil.Process(pid).net_connections(kind="tcp")
    if c.status == psutil.CONN_LISTEN
})
print(json.dumps({
    "listening": listening,
    "refused": refused,
    "node_ip": node.node_ip_address,
    "gcs": node.gcs_address,
    "token_auth": get_authentication_mode() == AuthenticationMode.TOKEN,
    "nodes": [n["NodeManagerAddress"] for n in ray.nodes()],
}))
ray.shutdown()
"""


@pytest.mark.ray  # a local Ray in a fresh process
def test_local_ray_binds_loopback_with_token_auth(tmp_path):
    """`dcv train`'s local Ray (cli.init_ray), in a fresh process: it refuses RAY_AUTH_MODE=disabled, and
    with RAY_AUTH_MODE unset Ray 2.60 turns token auth on for a new local cluster by itself; the GCS and
    raylet listen on 127.0.0.1 only."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    # A token of its own, so the test neither needs nor writes ~/.ray/auth_token.
    env.update(RAY_AUTH_TOKEN=uuid.uuid4().hex, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-c", PROBE_LOCAL_RAY],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["refused"].startswith("[ray] RAY_AUTH_MODE=disabled: dcv keeps Ray token auth on")
    assert seen["node_ip"] == "127.0.0.1"
    assert seen["gcs"].startswith("127.0.0.1:")
    assert seen["nodes"] == ["127.0.0.1"]
    assert seen["listening"] == ["127.0.0.1"]  # GCS and raylet ports: loopback only
    assert seen["token_auth"] is True
