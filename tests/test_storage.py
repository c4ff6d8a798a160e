"""dcv.storage: validated reads (invalid files moved aside), atomic writes on a full disk, the root's lock."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import save_file

from dcv.storage import (
    HOLDER_FILE,
    LOCK_FILE,
    SetAsideWarning,
    lock_storage,
    model_folder_problem,
    read_json,
    read_parquet,
    write_parquet,
)

PYTHON = sys.executable


def aside(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.corrupt-*"))


def test_a_truncated_parquet_is_moved_aside_and_reads_as_absent(tmp_path):
    path = write_parquet(pl.DataFrame({"a": list(range(500))}), tmp_path / "t.parquet")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.warns(
        SetAsideWarning, match=r"t\.parquet: unreadable parquet.*moved aside to t\.parquet\.corrupt-"
    ):
        assert read_parquet(path) is None
    assert not path.exists()
    [moved] = aside(path)
    assert moved.read_bytes() == data[: len(data) // 2]  # kept as it was, to inspect
    assert read_parquet(path) is None  # absent now: no second warning, nothing more moved
    assert len(aside(path)) == 1


def test_a_parquet_of_another_schema_or_size_is_moved_aside(tmp_path):
    schema = {"a": pl.Int64}
    path = write_parquet(pl.DataFrame({"a": [1, 2, 3]}), tmp_path / "t.parquet")
    assert read_parquet(path, schema, n_rows=3).height == 3
    with pytest.warns(SetAsideWarning, match="3 rows where 4 were expected"):
        assert read_parquet(path, schema, n_rows=4) is None
    write_parquet(pl.DataFrame({"a": ["x"]}), path)
    with pytest.warns(SetAsideWarning, match="not the expected table"):
        assert read_parquet(path, schema) is None
    assert len(aside(path)) == 2 and not path.exists()


def test_a_corrupted_json_marker_is_moved_aside(tmp_path):
    path = tmp_path / "marker.json"
    path.write_text('{"scores": {"a": 1.0}}')
    assert read_json(path, ("scores",)) == {"scores": {"a": 1.0}}
    path.write_text('{"scores": {"a": 1.')  # cut off mid-write by something other than dcv
    with pytest.warns(SetAsideWarning, match="not valid JSON"):
        assert read_json(path, ("scores",)) is None
    path.write_text('{"other": 1}')
    with pytest.warns(SetAsideWarning, match=r"without \['scores'\]"):
        assert read_json(path, ("scores",)) is None
    assert len(aside(path)) == 2
    assert read_json(tmp_path / "absent.json") is None


def model_folder(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"w": torch.zeros(64, 64), "b": torch.ones(64)}, folder / "model.safetensors")
    return folder


def test_model_folder_problem_finds_missing_and_truncated_weights(tmp_path):
    folder = model_folder(tmp_path / "m")
    assert model_folder_problem(folder) is None
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    assert "truncated" in model_folder_problem(folder)
    weights.write_bytes(b"\xff" * 8 + data[8:])
    assert "header length" in model_folder_problem(folder)
    weights.write_bytes(data[:8] + b"not json" + data[16:])
    assert "unreadable safetensors header" in model_folder_problem(folder)
    weights.unlink()
    assert "no weights file" in model_folder_problem(folder)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "part-1.safetensors"}})
    )
    assert model_folder_problem(folder) == "part-1.safetensors: missing"
    (folder / "config.json").unlink()
    assert model_folder_problem(folder) == "config.json: missing"


# A full disk: the writing process gets a file-size limit (RLIMIT_FSIZE), as a full filesystem would stop
# it. Python ignores SIGXFSZ from the start, so the write fails with EFBIG rather than killing the process.

WRITE_BIG_TABLE = """
import sys
import numpy as np, polars as pl
from dcv.storage import write_parquet
try:
    write_parquet(pl.DataFrame({"x": np.random.default_rng(0).random(200_000)}), sys.argv[1])
except OSError as exc:
    print(f"OSError errno={exc.errno}: {exc}")
    sys.exit(3)
"""


def size_limit(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.parametrize("existing", [True, False], ids=["over-an-old-table", "a-new-table"])
def test_a_write_that_hits_the_size_limit_leaves_no_half_file_under_its_name(tmp_path, existing):
    target = tmp_path / "table.parquet"
    if existing:
        write_parquet(pl.DataFrame({"x": [1.0, 2.0]}), target)
    before = target.read_bytes() if existing else None
    result = subprocess.run(
        [PYTHON, "-c", WRITE_BIG_TABLE, str(target)],
        preexec_fn=size_limit(64 * 1024),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 3, result.stderr
    # A clear error: the OS's (EFBIG here, ENOSPC on a full disk), naming the table it was writing.
    assert result.stdout.strip() == f"OSError errno=27: [Errno 27] File too large: '{target}'"
    assert not list(tmp_path.glob(".table.parquet.tmp-*"))  # the temporary file was removed
    if existing:
        assert target.read_bytes() == before  # the old table, whole, under the final name
    else:
        assert not target.exists()


def test_disk_full_errors_are_recognised_through_wrappers():
    from dcv.cli import is_disk_full

    assert is_disk_full(OSError(28, "No space left on device"))
    wrapped = RuntimeError("trial failed")
    wrapped.__cause__ = OSError(27, "File too large")
    assert is_disk_full(wrapped)
    assert is_disk_full(RuntimeError("first error: OSError: [Errno 28] No space left on device"))
    assert not is_disk_full(RuntimeError("CUDA out of memory"))


# The lock.

HOLD_LOCK = """
import sys, time
from dcv.storage import lock_storage
lock_storage(sys.argv[1], sys.argv[2])
print("locked", flush=True)
time.sleep(600)
"""

TRY_LOCK = """
import sys
from dcv.storage import StorageInUse, lock_storage
try:
    lock_storage(sys.argv[1], sys.argv[2], say=lambda line: print("said:", line, flush=True))
except StorageInUse as exc:
    print("refused:", exc, flush=True)
    sys.exit(2)
print("locked", flush=True)
"""


def hold_lock(root: Path, command: str) -> subprocess.Popen:
    holder = subprocess.Popen(
        [PYTHON, "-c", HOLD_LOCK, str(root), command],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def try_lock(root: Path, command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-c", TRY_LOCK, str(root), command], capture_output=True, text=True, timeout=60
    )


def test_the_lock_is_held_once_per_process_and_names_its_holder(tmp_path):
    root = tmp_path / "root"
    path = lock_storage(root, "dcv run demo.yaml")
    assert path == root.resolve() / LOCK_FILE
    assert lock_storage(root, "again") == path  # the same process: a no-op
    holder = json.loads((root / HOLDER_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["command"] == "dcv run demo.yaml"
    refused = try_lock(root, "dcv sweep demo.yaml")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"is in use by pid {os.getpid()}" in refused.stdout


def test_a_second_process_is_refused_at_once_and_a_killed_holders_lock_is_taken_over(tmp_path):
    root = tmp_path / "root"
    holder = hold_lock(root, "dcv run first.yaml")
    try:
        refused = try_lock(root, "dcv run second.yaml")
        assert refused.returncode == 2, refused.stdout + refused.stderr
        # At once: it never waits for the holder. The holder never lets go (it sleeps longer than
        # try_lock's timeout), so a refusal while it still runs can only come from a lock that does not wait.
        assert holder.poll() is None
        host = json.loads((root / HOLDER_FILE).read_text())["host"]
        line = refused.stdout.strip()
        assert line.startswith(f"refused: storage {root} is in use by pid {holder.pid} on {host} since ")
        assert "(command dcv run first.yaml)" in line
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # no clean exit: the holder file stays behind
        holder.wait()
    assert json.loads((root / HOLDER_FILE).read_text())["pid"] == holder.pid
    taken = try_lock(root, "dcv run third.yaml")
    assert taken.returncode == 0, taken.stdout + taken.stderr
    said, locked = taken.stdout.strip().splitlines()
    assert said.startswith(f"said: storage {root}: taking over the lock of pid {holder.pid} on {host}")
    assert said.endswith("which ended without releasing it") and locked == "locked"
    assert not (root / HOLDER_FILE).exists()  # the third process exited cleanly: its holder file went with it
    again = try_lock(root, "dcv run fourth.yaml")
    assert again.returncode == 0 and "said:" not in again.stdout  # a clean exit leaves nothing to take over


def test_an_object_store_root_without_a_lease_locks_a_local_file_named_after_it(tmp_path, monkeypatch):
    """gs:// (and any store but S3, whose lock is a lease: tests/test_storage_s3.py)."""
    monkeypatch.setenv("DCV_CACHE_DIR", str(tmp_path / "cache"))
    holder = subprocess.Popen(
        [PYTHON, "-c", HOLD_LOCK, "gs://bucket/runs/demo", "dcv run gs.yaml"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "DCV_CACHE_DIR": str(tmp_path / "cache")},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert len(list((tmp_path / "cache" / "locks").glob("*.lock"))) == 1
        refused = subprocess.run(
            [PYTHON, "-c", TRY_LOCK, "gs://bucket/runs/demo", "dcv run other.yaml"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "DCV_CACHE_DIR": str(tmp_path / "cache")},
        )
        assert refused.returncode == 2 and "storage gs://bucket/runs/demo is in use" in refused.stdout
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()


@pytest.mark.e2e
def test_a_second_dcv_command_on_a_locked_root_exits_2_before_anything_starts(
    tiny_config_file, tmp_path, monkeypatch, capsys
):
    """The two-terminal case through the CLI (``main`` in this process; the lock's holder is another
    process): the root is held; run, sweep, train and calibrate refuse after their read-only checks and
    before Ray, a log or an MLflow store; validate needs no lock. (patch-all's own check, a results table,
    fails first on this empty root; the fault chain runs the same case as two `dcv run` processes.)"""
    from dcv import cli

    def no_ray() -> None:
        raise AssertionError("Ray was started on a locked root")

    monkeypatch.setattr(cli, "init_ray", no_ray)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    storage = tmp_path / "storage"
    holder = hold_lock(storage, f"dcv run {tiny_config_file}")
    try:
        for command in (["run"], ["sweep"], ["train", "--method", "sft"], ["calibrate"]):
            capsys.readouterr()
            assert cli.main([command[0], str(tiny_config_file), *command[1:]]) == 2
            stderr = capsys.readouterr().err
            assert (
                f"dcv {command[0]}: storage {storage.resolve()} is in use by pid {holder.pid} on " in stderr
            )
            assert f"(command dcv run {tiny_config_file})" in stderr
        assert sorted(p.name for p in storage.iterdir()) == [LOCK_FILE, HOLDER_FILE]  # nothing else written
        assert cli.main(["validate", str(tiny_config_file)]) == 0
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
