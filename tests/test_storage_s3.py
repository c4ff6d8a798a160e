"""dcv.storage on a real S3 API (moto's server on 127.0.0.1, the s3_root fixture): tables, markers and
atomic writes on an object store, the lease that locks an S3 root, ``dcv validate`` and ``dcv run``
agreeing on every kind of storage root, and ``dcv report`` reading and writing an ``s3://`` root."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import polars as pl
import pytest
import torch
from safetensors.torch import save_file

from dcv.cli import main
from dcv.config import config_to_dict, load_config, parse_config
from dcv.object_store import Lease, LeaseTaken, ObjectPath, upload
from dcv.results import write_results
from dcv.storage import (
    EFFECTS_FILE,
    LOCK_FILE,
    SetAsideWarning,
    atomic_path,
    circuits_dir,
    local_model_folder,
    model_folder_problem,
    patching_dir,
    read_json,
    read_parquet,
    storage_path,
    write_parquet,
)
from tests.helpers import (
    circuits_table,
    effects_table,
    results_table,
    tiny_config_dict,
)

PYTHON = sys.executable


def test_tables_and_markers_on_s3(s3_root):
    root = storage_path(s3_root)
    assert isinstance(root, ObjectPath) and str(root) == s3_root
    table = pl.DataFrame({"a": list(range(300)), "b": ["x"] * 300})
    path = write_parquet(table, root / "analysis" / "t.parquet")
    assert str(path) == f"{s3_root}/analysis/t.parquet" and path.is_file() and root.is_dir()
    assert read_parquet(path, {"a": pl.Int64, "b": pl.String}, n_rows=300).equals(table)
    with atomic_path(root / "marker.json") as tmp:
        tmp.write_text(json.dumps({"done": 1}))
    assert read_json(root / "marker.json", keys=["done"]) == {"done": 1}
    with atomic_path(root / "marker.json", replace=False) as tmp:  # another writer finished first: it wins
        tmp.write_text(json.dumps({"done": 2}))
    assert read_json(root / "marker.json") == {"done": 1}
    assert read_parquet(root / "absent.parquet") is None and read_json(root / "absent.json") is None
    # A truncated object is moved aside (copy + delete) and reads as absent, as on a local disk.
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(SetAsideWarning, match=r"t\.parquet: unreadable parquet.*moved aside to t\.parquet"):
        assert read_parquet(path) is None
    assert not path.exists()
    assert [p.name for p in (root / "analysis").glob("t.parquet.corrupt-*")]


def test_a_failed_write_leaves_no_object(s3_root):
    target = storage_path(s3_root) / "results" / "checkpoints.parquet"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        pl.DataFrame({"a": [1]}).write_parquet(tmp)
        raise RuntimeError("killed mid-stage")
    assert not target.exists() and not target.parent.exists()


def test_a_model_folder_on_s3_is_copied_once_per_node_keyed_by_content_and_checked(
    s3_root, tmp_path, monkeypatch
):
    monkeypatch.setenv("DCV_CACHE_DIR", str(tmp_path / "cache"))
    source = storage_path(s3_root) / "trials" / "t" / "checkpoint_000004"
    (source / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"w": torch.arange(64, dtype=torch.float32)}, tmp_path / "model.safetensors")
    upload(tmp_path / "model.safetensors", source / "model.safetensors")
    # Ray Train's uploads (pyarrow's create_dir) leave "folder/" marker objects: they are no files.
    source.fs.create_dir(source.key)
    assert model_folder_problem(source) is None  # checked on the store, headers only
    local = local_model_folder(source)
    assert sorted(p.name for p in local.iterdir()) == ["config.json", "model.safetensors"]
    assert local.is_relative_to(tmp_path / "cache" / "storage")
    assert local.name.startswith("checkpoint_000004-")
    assert (local / "model.safetensors").read_bytes() == (tmp_path / "model.safetensors").read_bytes()
    inode = (local / "model.safetensors").stat().st_ino
    assert local_model_folder(source) == local  # the copy is found: not downloaded again
    assert (local / "model.safetensors").stat().st_ino == inode
    assert local_model_folder(tmp_path) == tmp_path  # a local folder is itself
    # Rewritten under the same URI: another key, another copy. Truncated: refused, and no copy kept.
    save_file({"w": torch.zeros(64)}, tmp_path / "model.safetensors")
    upload(tmp_path / "model.safetensors", source / "model.safetensors")
    assert local_model_folder(source) != local
    (source / "model.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes()[:100])
    assert "model.safetensors: truncated" in model_folder_problem(source)
    with pytest.raises(ValueError, match=rf"{source}: not a loadable model folder .*model\.safetensors"):
        local_model_folder(source)
    assert len(list((tmp_path / "cache" / "storage").iterdir())) == 2


def test_the_lease_admits_one_live_holder_and_a_dead_ones_lease_is_taken_over(s3_root):
    """The S3 lock's promise (dcv.object_store.Lease), step by step against the server: a second taker is
    refused while the lease is renewed; once its holder stops renewing for lease_s (by the store's clock)
    it is taken over, exactly the lease read (If-Match); the old holder then finds it lost, and its
    release does not delete the new holder's lease."""
    root = storage_path(s3_root)
    # lease_s 4: LastModified and the server's Date have 1 s resolution; the waits leave 1 s either side.
    first, second = Lease(root, lease_s=4.0), Lease(root, lease_s=4.0)
    assert first.take("dcv run a.yaml") is None
    assert json.loads((root / LOCK_FILE).read_text())["command"] == "dcv run a.yaml"
    with pytest.raises(LeaseTaken) as taken:
        second.take("dcv run b.yaml")
    assert taken.value.holder["pid"] == os.getpid() and taken.value.holder["command"] == "dcv run a.yaml"
    time.sleep(2.5)
    assert first.renew()
    time.sleep(3.0)  # 5.5 s after the take: without the renewal the lease would be stale now
    with pytest.raises(LeaseTaken):
        second.take("dcv run b.yaml")
    time.sleep(3.5)  # first stops renewing (as a killed holder does): 6.5 s since its last renewal
    stale = second.take("dcv run b.yaml")
    assert stale["command"] == "dcv run a.yaml"
    assert not first.renew() and first.lost
    first.release()
    assert json.loads((root / LOCK_FILE).read_text())["command"] == "dcv run b.yaml"
    second.release()
    assert not (root / LOCK_FILE).exists()


def test_a_take_over_loses_to_a_renewal_after_its_read_and_a_kept_lease_reports_its_loss(s3_root):
    """The compare-and-swap under the take-over: a renewal changes the ETag, so a take-over that read the
    lease before it fails; and ``keep``'s thread calls on_lost once the lease is gone."""
    import boto3
    from botocore.exceptions import ClientError

    root = storage_path(s3_root)
    holder = Lease(root, lease_s=0.6)
    holder.take("dcv run a.yaml")
    read = holder.etag  # what a contender judging the lease stale would have read
    assert holder.renew() and holder.etag != read
    client = boto3.client("s3")
    bucket, key = holder.bucket_key
    with pytest.raises(ClientError, match="PreconditionFailed"):
        client.put_object(Bucket=bucket, Key=key, Body=b"{}", IfMatch=read)
    lost: list[str] = []
    holder.keep(lost.append)
    client.delete_object(Bucket=bucket, Key=key)  # gone (an operator removed it, or a take-over)
    deadline = time.monotonic() + 10
    while not lost and time.monotonic() < deadline:
        time.sleep(0.1)
    holder.release()
    assert lost == [f"storage {s3_root}: the lock was taken over by another process"] and holder.lost


HOLD_THEN_TRY = """
import sys, time
from dcv.storage import StorageInUse, lock_storage
try:
    lock_storage(sys.argv[1], sys.argv[2])
except StorageInUse as exc:
    print("refused:", exc, flush=True)
    sys.exit(2)
print("locked", flush=True)
time.sleep(float(sys.argv[3]))
"""


def test_a_second_command_on_a_locked_s3_root_is_refused_naming_the_holder(s3_root):
    holder = subprocess.Popen(
        [PYTHON, "-c", HOLD_THEN_TRY, s3_root, "dcv run s3.yaml", "600"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = subprocess.run(
            [PYTHON, "-c", HOLD_THEN_TRY, s3_root, "dcv run other.yaml", "0"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert f"storage {s3_root} is in use by pid {holder.pid}" in refused.stdout
        assert "(command dcv run s3.yaml)" in refused.stdout
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    # Killed: its lease stays (a holder on another machine is judged by the lease's age, LEASE_S: the Lease
    # test above); a rerun on this machine sees that the holder's pid is gone and takes it over at once.
    assert json.loads((storage_path(s3_root) / LOCK_FILE).read_text())["pid"] == holder.pid
    rerun = subprocess.run(
        [PYTHON, "-c", HOLD_THEN_TRY, s3_root, "dcv run s3.yaml", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rerun.returncode == 0 and rerun.stdout.strip().endswith("locked"), rerun.stdout + rerun.stderr
    assert f"taking over the lock of pid {holder.pid} on " in rerun.stdout


# dcv validate == dcv run on storage roots.


def roots(s3_root: str, tmp_path) -> dict[str, tuple[str, str | None]]:
    """root -> (its kind, a phrase of the error both must give, or None for ok)."""
    bucket = s3_root.removeprefix("s3://").split("/")[0]
    return {
        str(tmp_path / "local"): ("a local folder", None),
        f"file://{tmp_path}/file-uri": ("file://", None),
        "relative/run": ("a relative folder (made absolute where the config loads)", None),
        s3_root: ("S3, reachable", None),
        f"s3://missing-{bucket}/run": ("S3, no such bucket", "does not exist"),
        "foo://bucket/run": ("an unknown scheme", "pyarrow.fs cannot open foo://"),
        "abfs://container/run": ("Azure without an account", "pyarrow.fs cannot open abfs://"),
    }


def verdict(error: BaseException | str | None) -> str:
    """ "ok", or the error's last line without the command's prefix ("dcv validate: ")."""
    return "ok" if error is None else str(error).strip().splitlines()[-1].removeprefix("dcv validate: ")


def test_validate_and_run_give_the_same_verdict_on_every_root(s3_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.yaml"
    raw = tiny_config_dict(tmp_path / "unused")
    raw["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"  # one store for every root: made once
    config.write_text(json.dumps(raw))
    cases = roots(s3_root, tmp_path) | {
        "s3://unreachable/run": ("S3, endpoint down", "cannot reach the store"),
    }
    from dcv.experiment import preflight

    for root, (kind, phrase) in cases.items():
        if root == "s3://unreachable/run":
            monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on port 9
        code = main(["validate", str(config), "--set", f"storage.root={root}"])
        out = capsys.readouterr()
        validated = None if code == 0 else out.err
        cfg = load_config(config, [f"storage.root={root}"])
        try:
            preflight(cfg)
            run = None
        except ValueError as exc:
            run = exc
        assert verdict(validated) == verdict(run), kind
        if phrase is None:
            assert code == 0 and run is None, (kind, out.err)
        else:
            assert code == 2 and phrase in str(run) and f"storage.root={root!r}" in str(run), (kind, run)


@pytest.mark.e2e  # the whole `dcv report` command: analysis, figures, MLflow (about 25 s on 2 busy cores)
def test_dcv_report_reads_and_writes_an_s3_root(s3_root, tmp_path, monkeypatch, capsys):
    """A run's stage tables on S3 (as its stages would leave them), then ``dcv report s3://...``: the
    analysis tables and the report land on S3, nothing under the working directory but MLflow's."""
    monkeypatch.chdir(tmp_path)
    raw = tiny_config_dict(tmp_path)
    raw["probes"] = [{"name": "ioi", "n_items": 8}]
    raw["patching"]["methods"] = ["exact"]
    raw["circuits"].update(n_bootstrap=50)
    raw["storage"] = {"root": s3_root}
    raw["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = parse_config(raw)
    root = storage_path(s3_root)
    (root / "experiment_config.json").write_text(json.dumps(config_to_dict(cfg)))
    write_results(results_table(), root)
    write_parquet(effects_table(), patching_dir(root) / EFFECTS_FILE)
    write_parquet(circuits_table(), circuits_dir(root) / "circuits.parquet")

    assert main(["report", s3_root]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"report: {s3_root}/report/report.html" in out and f"tables: {s3_root}/analysis" in out
    for name in ("analysis/headline.parquet", "analysis/headline.csv", "report/report.html"):
        assert (root / name).is_file(), name
    assert "## The answer: SFT vs RL" in (root / "report" / "report.md").read_text()
    assert [p.name for p in (root / "report" / "figures").glob("*.png")]
    assert read_parquet(root / "analysis" / "headline.parquet").height > 0
    assert not (tmp_path / "s3:").exists()
