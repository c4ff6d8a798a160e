"""The storage root: one writer at a time, no half-written file, and no invalid file read back as done.

Three rules every stage follows through this module:

- **Writes are atomic** (``atomic_path``, ``write_parquet``): a file or folder is written under a temporary
  sibling name and renamed into place, so a crash, a kill or a full disk leaves the old file (or none),
  never a half-written one under the final name.
- **Reads are validated** (``read_parquet``, ``read_json``, ``model_folder_problem``): a file that is
  there but cannot be what the stage wrote (a truncated or corrupted parquet, the wrong schema or row
  count, JSON that does not parse or lacks its keys, a model folder without loadable weights) is moved
  aside to ``<name>.corrupt-<YYYYmmdd-HHMMSS>`` with one warning naming it, and the caller treats it as
  absent: the work is redone. Nothing is deleted; the moved file is there to inspect.
- **One dcv command writes a root at a time** (``lock_storage``): see that function for what the lock
  promises and what it cannot.

The root is a local folder or an object store (``s3://``, ``gs://``, what ``pyarrow.fs`` opens):
``storage_path`` resolves it, and every function here takes a local ``Path`` or a
``dcv.object_store.ObjectPath`` alike; how the three rules hold on an object store is in that module's
docstring and docs/cluster.md "Storage roots" (``check_storage_root`` says which commands accept one).
Being the one filesystem interface is why this module is over 600 lines.

It is also the one storage layout (the "Layout" section below): every folder and file name under the
root, the model ids every table shares (``base``, ``<trial>@<step>``), file slugs and the content hash
that names cached work. No module imports a stage to find a name.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import socket
import struct
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from dcv.object_store import (
    LEASE_S,
    Lease,
    LeaseTaken,
    ObjectPath,
    download_folder,
    object_path,
    upload,
    upload_folder,
)

if TYPE_CHECKING:
    from dcv.config import ExperimentConfig

LOCK_FILE = "dcv.lock"  # in the storage root; flock'ed, never replaced (a new inode would be a new lock)
HOLDER_FILE = "dcv.lock.holder.json"  # beside it: who holds the lock (pid, host, command, since)
CORRUPT_MARK = ".corrupt-"  # <name>.corrupt-<time>: where an invalid file is moved aside


# --- Layout -------------------------------------------------------------------------------------------

BASE_MODEL = "base"  # the model id of the base model in every table; checkpoints are "<trial>@<step>"

# Folders under the storage root, and the assembled table of each stage.
TRIALS_DIR = "trials"  # <trial>/checkpoint_*/: Ray Train checkpoints, HF folders
SWEEPS_DIR = "sweeps"  # <sweep.name>/: Tune's experiment state
RESULTS_DIR, RESULTS_FILE = "results", "checkpoints.parquet"  # one row per evaluated checkpoint
# <hash>.json: the base model's step-0 scores, shared by trials; <hash>.kl_reference.json: its KL samples
BASE_SCORES_DIR = "base_scores"
BENCHMARKS_DIR, BENCHMARKS_FILE = "benchmarks", "benchmarks.parquet"
PATCHING_DIR, EFFECTS_FILE = "patching", "effects.parquet"  # items/<item_id>.parquet: one work item each
CMAP_FILE = "cmap.parquet"  # beside effects.parquet: cross-model patching, one row per head and direction
CIRCUITS_DIR, CIRCUITS_FILE = "circuits", "circuits.parquet"  # models/<model>__<hash>.parquet
NOISE_FLOOR_FILE = "noise_floor.parquet"  # beside circuits.parquet
FAITHFULNESS_CURVES_FILE = "faithfulness_curves.parquet"  # beside circuits.parquet (dcv.circuits.curves)
CALIBRATION_DIR, CALIBRATION_FILE = "calibration", "calibration.parquet"  # models/: planted HF folders
WEIGHT_CHANGE_DIR, WEIGHT_CHANGE_FILE = (
    "weight_change",
    "weight_change.parquet",
)  # models/<model>__<hash>.parquet
EXTERNAL_DIR = "external"  # items/<run>_<step>__<hash>.parquet: external checkpoints' scores (dcv.external)
ANALYSIS_DIR = "analysis"
LOGS_DIR = "logs"


# --- Where the root is: a local folder or an object store -----------------------------------------

StoragePath = Path | ObjectPath  # a file or folder under the root: local, or on an object store

STORAGE_ROOTS_DOC = 'docs/cluster.md "Storage roots"'


def is_remote_storage(root: str) -> bool:
    return "://" in str(root) and not str(root).startswith("file://")


def storage_path(root: str | StoragePath) -> StoragePath:
    """The root a ``storage.root`` string names: an absolute local folder (a path or ``file://``), or an
    ``ObjectPath`` on the object store ``pyarrow.fs`` opens for its scheme (``s3://``, ``gs://``, ...;
    options from the environment, dcv.object_store). A ValueError for a scheme pyarrow cannot open."""
    if isinstance(root, ObjectPath):
        return root
    if not is_remote_storage(str(root)):
        return Path(str(root).removeprefix("file://")).expanduser().resolve()
    return object_path(str(root))


def as_path(path: str | StoragePath) -> StoragePath:
    """``path`` as a path: an ``ObjectPath`` (or object-store URI) stays on its store, anything else is
    a local ``Path`` (relative stays relative, as ``Path(path)``)."""
    if isinstance(path, ObjectPath):
        return path
    return object_path(str(path)) if is_remote_storage(str(path)) else Path(path)


def storage_root(cfg: ExperimentConfig) -> StoragePath:
    """The storage root of ``cfg``: an absolute local folder or an ``ObjectPath`` (``storage_path``)."""
    return storage_path(cfg.storage.root)


def ray_storage(folder: StoragePath) -> dict[str, Any]:
    """``storage_path`` (and ``storage_filesystem``) for Ray Train's and Tune's ``RunConfig``: Ray persists
    checkpoints and experiment state under ``folder`` itself, on a local disk or through the object
    store's ``pyarrow.fs`` filesystem (the one dcv opened, so its endpoint and region are Ray's too)."""
    if isinstance(folder, ObjectPath):
        return {"storage_path": folder.key, "storage_filesystem": folder.fs}
    return {"storage_path": str(folder)}


def checkpoint_path(checkpoint: Any) -> StoragePath:
    """Where a ``ray.train.Checkpoint`` lives, as a dcv path: its ``path`` is a key of its ``filesystem``
    (a local path, or ``bucket/prefix/...`` on an object store)."""
    scheme = checkpoint.filesystem.type_name
    if scheme == "local":
        return Path(checkpoint.path)
    return ObjectPath("gs" if scheme == "gcs" else scheme, checkpoint.path.strip("/"), checkpoint.filesystem)


def remove(path: StoragePath) -> None:
    """Delete a file or a folder (every object under the prefix, on an object store)."""
    if isinstance(path, ObjectPath):
        path.fs.delete_dir(path.key) if path.is_dir() else path.unlink()
    else:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def check_storage_root(root: str) -> StoragePath:
    """``storage.root`` as ``dcv run`` can use it, else a ValueError naming ``storage.root``: the one
    check of the root that ``dcv validate`` and ``dcv run``'s preflight both make (so they agree).

    A local folder (or ``file://``) is always usable. An object store must open (a scheme ``pyarrow.fs``
    knows), answer (its endpoint reachable, the credentials accepted) and have its bucket. Reads only:
    nothing is written."""
    if not is_remote_storage(root):
        return storage_path(root)
    try:
        path = storage_path(root)
    except ValueError as exc:
        raise ValueError(
            f"storage.root={root!r}: {exc}; use a local folder, file://, s3:// or gs:// ({STORAGE_ROOTS_DOC})"
        ) from None
    bucket = path.key.split("/")[0]
    try:
        found = path.fs.get_file_info(bucket).type.name != "NotFound"
    except OSError as exc:
        raise ValueError(
            f"storage.root={root!r}: cannot reach the store ({str(exc).splitlines()[0][:300]}); check "
            "the endpoint and credentials in the environment (AWS_ENDPOINT_URL, AWS_REGION, "
            "AWS_ACCESS_KEY_ID / AWS_PROFILE; GOOGLE_APPLICATION_CREDENTIALS for gs://)"
        ) from None
    if not found:
        raise ValueError(f"storage.root={root!r}: bucket {bucket!r} does not exist; create it first")
    return path


def trials_dir(storage_root: StoragePath) -> StoragePath:
    return as_path(storage_root) / TRIALS_DIR


def sweeps_dir(storage_root: StoragePath) -> StoragePath:
    return as_path(storage_root) / SWEEPS_DIR


def results_dir(storage_root: StoragePath) -> StoragePath:
    return as_path(storage_root) / RESULTS_DIR


def base_scores_dir(storage_root: StoragePath) -> StoragePath:
    return as_path(storage_root) / BASE_SCORES_DIR


def benchmarks_dir(storage_root: StoragePath) -> StoragePath:
    return as_path(storage_root) / BENCHMARKS_DIR


def patching_dir(storage_root: StoragePath) -> StoragePath:
    return as_path(storage_root) / PATCHING_DIR


def items_dir(storage_root: StoragePath) -> StoragePath:
    """The patching stage's per-item files."""
    return patching_dir(storage_root) / "items"


def circuits_dir(storage_root: StoragePath) -> StoragePath:
    return as_path(storage_root) / CIRCUITS_DIR


def calibration_dir(storage_root: StoragePath) -> StoragePath:
    return as_path(storage_root) / CALIBRATION_DIR


def weight_change_dir(storage_root: StoragePath) -> StoragePath:
    return as_path(storage_root) / WEIGHT_CHANGE_DIR


def external_dir(storage_root: StoragePath) -> StoragePath:
    return as_path(storage_root) / EXTERNAL_DIR


def analysis_dir(storage_root: StoragePath) -> StoragePath:
    return as_path(storage_root) / ANALYSIS_DIR


def logs_dir(storage_root: StoragePath) -> StoragePath:
    return as_path(storage_root) / LOGS_DIR


def model_id(trial: str, step: int) -> str:
    """The id of a trial's checkpoint in every table: ``<trial>@<step>``."""
    return f"{trial}@{step}"


def checkpoint_model(trial: str, step: int, init: str) -> str:
    """The model id of a results-table row. A trial's step 0 holds the weights it started from (saved
    before the first step): the base model for ``init`` "base", the SFT checkpoint ``<sft trial>@<step>``
    for "sft:<sft trial>@<step>" (GRPO after SFT), so each model is patched once."""
    if step != 0:
        return model_id(trial, step)
    return BASE_MODEL if init == "base" else init.removeprefix("sft:")


def file_slug(text: str) -> str:
    """``text`` safe as part of a file name."""
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text).strip("_.") or "model"


def content_hash(decides: Any, length: int = 12) -> str:
    """A stable hex digest of everything that decides a cached file's contents (JSON-able): the end of
    its name, so a changed config never reuses a stale file."""
    return hashlib.sha256(json.dumps(decides, sort_keys=True).encode()).hexdigest()[:length]


def probe_key(cfg: ExperimentConfig, probe: str) -> dict:
    """What decides a probe's items, for cache keys: its config and, for ``chem`` (whose items are the
    target task's questions, `dcv.tasks.probes.build_probe`), the target task. Other probes leave the
    target task out, so changing it does not recompute them."""
    key = {"probe": cfg.probe(probe).model_dump(mode="json")}
    if probe == "chem":
        key["target_task"] = cfg.target_task.model_dump(mode="json")
    return key


@contextmanager
def atomic_path(target: StoragePath, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of ``target`` to write; on success it is renamed to ``target``.

    With ``replace=False`` an existing target wins (another process finished the same work first).
    A write that fails (an exception, a full disk: ``OSError`` ENOSPC or EFBIG) removes the temporary
    sibling and leaves ``target`` as it was.

    On an object store (``target`` an ``ObjectPath``) the yielded path is a local temporary file (or
    folder), uploaded on success: a file as one object, which appears whole or not at all, so no rename
    is needed (dcv.object_store); a folder object by object, so a reader may see part of it (and the
    objects of an older folder that the new one lacks stay).
    """
    if isinstance(target, ObjectPath):
        with _uploaded(target, replace) as tmp:
            yield tmp
        return
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if target.exists() and replace:
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        try:
            tmp.rename(target)
        except OSError:
            if replace or not target.exists():
                raise
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


@contextmanager
def _uploaded(target: ObjectPath, replace: bool) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="dcv-upload-") as folder:
        tmp = Path(folder) / target.name
        yield tmp
        if not replace and target.exists():  # checked, then uploaded: two racing writers of the same
            return  # work both upload, and the last one's object stays (whole)
        if tmp.is_dir():
            upload_folder(tmp, target)
        elif tmp.exists():
            upload(tmp, target)


@contextmanager
def local_folder(target: StoragePath) -> Iterator[Path]:
    """A local folder to write ``target``'s files in: ``target`` itself when it is local (written in
    place), else a temporary folder uploaded to it file by file when the block ends without an error (for
    writers that need a local path: matplotlib, MLflow's log_artifact)."""
    if not isinstance(target, ObjectPath):
        yield Path(target)
        return
    with tempfile.TemporaryDirectory(prefix="dcv-folder-") as folder:
        yield Path(folder)
        upload_folder(Path(folder), target)


def local_model_folder(folder: str | StoragePath) -> Path:
    """An HF model folder on local disk, for loaders that need one (transformers, safetensors, lm-eval):
    ``folder`` itself when it is local; on an object store its node-local copy under ``cache_dir()``,
    downloaded once per node and keyed by URI and content (dcv.object_store.download_folder), then
    checked with ``model_folder_problem``. A copy that is not a loadable model folder is removed (so a
    fixed folder is fetched again) and is a ValueError naming the URI."""
    path = as_path(folder)
    if not isinstance(path, ObjectPath):
        return path
    local = download_folder(path, cache_dir())
    problem = model_folder_problem(local)
    if problem:
        shutil.rmtree(local, ignore_errors=True)
        raise ValueError(f"{path}: not a loadable model folder ({problem})")
    return local


def cache_dir() -> Path:
    """dcv's node-local cache: ``$DCV_CACHE_DIR``, else ``~/.cache/dcv`` (converted models: models/)."""
    return Path(os.environ.get("DCV_CACHE_DIR", Path.home() / ".cache" / "dcv")).expanduser()


def write_parquet(frame: pl.DataFrame, target: StoragePath) -> StoragePath:
    """Write ``frame`` to ``target`` atomically. A full disk is an ``OSError`` naming ``target`` (polars
    reports it as a ComputeError "... (os error 28)"; callers look for the OS's error)."""
    with atomic_path(target) as tmp:
        try:
            frame.write_parquet(tmp)
        except pl.exceptions.PolarsError as exc:
            code = re.search(r"\(os error (\d+)\)", str(exc))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(target)) from exc
    return as_path(target)


# Validated reads.


class SetAsideWarning(UserWarning):
    """An invalid file was moved aside (``<name>.corrupt-<time>``); the work that made it is redone."""


def set_aside(path: StoragePath, reason: str) -> StoragePath:
    """Move ``path`` (file or folder) to ``<name>.corrupt-<YYYYmmdd-HHMMSS>`` beside it and warn once,
    naming both; returns the new path. The ``.corrupt-`` suffix comes after the whole name, so no glob
    a stage uses (``*.parquet``, ``checkpoint_*/...``) matches the moved file. On an object store the
    move is a copy and a delete (dcv.object_store)."""
    path = as_path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = path.with_name(f"{path.name}{CORRUPT_MARK}{stamp}")
    n = 1
    while moved.exists():  # two in one second
        n += 1
        moved = path.with_name(f"{path.name}{CORRUPT_MARK}{stamp}-{n}")
    path.rename(moved)
    warnings.warn(f"{path}: {reason}; moved aside to {moved.name}, redoing it", SetAsideWarning, stacklevel=2)
    return moved


# What a truncated or corrupted parquet file raises: polars' own errors, the OS's, and a Rust panic in
# the reader (pyo3's PanicException derives from BaseException, so `except Exception` would miss it).
_PARQUET_ERRORS = (OSError, pl.exceptions.PolarsError, pl.exceptions.PanicException)


def read_parquet(
    path: StoragePath, schema: dict | None = None, n_rows: int | None = None
) -> pl.DataFrame | None:
    """The table at ``path``, or None when it is absent or invalid (a rerun then recomputes it).

    Invalid: unreadable (truncated, not parquet), or, when given, another ``schema`` (column names, order
    and types) or another row count than ``n_rows``. An invalid file is moved aside (``set_aside``)."""
    path = as_path(path)
    if not path.is_file():
        return None
    try:
        # An object is read whole, once: parquet's footer-first reads would be a request each.
        table = pl.read_parquet(io.BytesIO(path.read_bytes()) if isinstance(path, ObjectPath) else path)
    except _PARQUET_ERRORS as exc:
        set_aside(path, f"unreadable parquet ({type(exc).__name__}: {str(exc)[:120]})")
        return None
    if schema is not None and table.schema != schema:
        got = ", ".join(f"{k}: {v}" for k, v in table.schema.items())
        set_aside(path, f"not the expected table (columns {got[:200]})")
        return None
    if n_rows is not None and table.height != n_rows:
        set_aside(path, f"{table.height} rows where {n_rows} were expected")
        return None
    return table


def read_json(path: StoragePath, keys: Sequence[str] = ()) -> Any | None:
    """The JSON value at ``path``, or None when it is absent or invalid (moved aside: ``set_aside``).

    Invalid: unreadable, not JSON (a truncated or overwritten marker), or, when ``keys`` are given, not an
    object holding all of them."""
    path = as_path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        set_aside(path, f"not valid JSON ({type(exc).__name__}: {str(exc)[:120]})")
        return None
    if keys:
        missing = [k for k in keys if not isinstance(data, dict) or k not in data]
        if missing:
            set_aside(path, f"a JSON marker without {missing}")
            return None
    return data


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SAFETENSORS_INDEX = "model.safetensors.index.json"
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the header's size


def safetensors_problem(path: StoragePath) -> str | None:
    """What is wrong with a ``.safetensors`` file, or None: its header (8-byte length, then JSON) must
    parse, and the file must be as long as the header says (a truncated copy fails here). On an object
    store only the header is read (a ranged read), as on a local disk."""
    try:
        if isinstance(path, ObjectPath):
            size, opened = path.fs.get_file_info(path.key).size, path.fs.open_input_file(path.key)
        else:
            size, opened = path.stat().st_size, open(path, "rb")
        with opened as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > _MAX_HEADER or 8 + length > size:
                return f"{path.name}: header length {length} does not fit the file ({size} bytes)"
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as exc:
        return f"{path.name}: unreadable safetensors header ({type(exc).__name__})"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    if not ends:
        return f"{path.name}: no tensors in the header"
    if 8 + length + max(ends) > size:
        return f"{path.name}: truncated ({size} bytes, the header needs {8 + length + max(ends)})"
    return None


def model_folder_problem(folder: str | StoragePath) -> str | None:
    """What is wrong with an HF model folder (local or on an object store), or None: ``config.json``
    parses, and the weights are there with loadable headers (``model.safetensors``, the shards of
    ``model.safetensors.index.json``, or a ``pytorch_model.bin``). Cheap: reads headers, never the tensors."""
    folder = as_path(folder)
    try:
        json.loads((folder / "config.json").read_bytes())
    except (OSError, ValueError) as exc:
        return f"config.json: {'missing' if isinstance(exc, FileNotFoundError) else 'not valid JSON'}"
    if (folder / SAFETENSORS_INDEX).is_file():
        try:
            shards = sorted(set(json.loads((folder / SAFETENSORS_INDEX).read_bytes())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError):
            return f"{SAFETENSORS_INDEX}: unreadable"
    elif (folder / WEIGHT_FILES[0]).is_file():
        shards = [WEIGHT_FILES[0]]
    elif (folder / WEIGHT_FILES[1]).is_file():
        return None
    else:
        return f"no weights file ({', '.join(WEIGHT_FILES)} or {SAFETENSORS_INDEX})"
    for shard in shards:
        problem = safetensors_problem(folder / shard) if (folder / shard).is_file() else f"{shard}: missing"
        if problem:
            return problem
    return None


# The lock.


class StorageInUse(ValueError):
    """Another dcv command holds the storage root (``lock_storage``); a ValueError, so the CLI reports it
    as it does a bad setting (one line, exit 2)."""


@dataclass(frozen=True)
class LockHolder:
    pid: int
    host: str
    command: str
    since: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.since} (command {self.command})"


_held: dict[StoragePath, int | Lease] = {}  # lock file -> its descriptor (or S3 lease), held until exit


def lock_file(root: str | Path) -> Path:
    """The lock file of a storage root: ``<root>/dcv.lock``; for an object-store URI (``s3://...``), a
    file named after the URI in dcv's local cache (``$DCV_CACHE_DIR``, else ``~/.cache/dcv``)."""
    if isinstance(root, str) and "://" in root and not root.startswith("file://"):
        return cache_dir() / "locks" / f"{hashlib.sha256(root.encode()).hexdigest()[:16]}.lock"
    return Path(str(root).removeprefix("file://")).expanduser().resolve() / LOCK_FILE


def lock_storage(root: str | Path, command: str, say: Callable[[str], None] = print) -> Path:
    """Take the storage root's lock for the rest of this process's life, or raise StorageInUse at once.

    The lock is an exclusive ``fcntl.flock`` on ``<root>/dcv.lock``, on a descriptor that stays open
    until the process ends (and is not inherited by the processes it starts: Ray's are not holders).
    The kernel drops it however the holder ends, SIGKILL included, so a crashed run never blocks the
    next one. Who holds it (pid, host, command, start time) is written beside it, in
    ``dcv.lock.holder.json``, and removed on a clean exit; a holder file found by a process that got the
    lock was left by a holder that died (a kill, a crash): ``say`` gets one line naming it, and the lock
    is taken over. Calling it again in the same process for the same root is a no-op.

    What it promises: on a local filesystem, no two dcv commands write one root at once. On a network
    filesystem it holds across hosts where the mount supports locks (NFS v3 with lockd, NFS v4, Lustre
    mounted with ``flock``); an NFS mount with ``nolock`` keeps locks per host. A filesystem that refuses
    locks (ENOLCK, some FUSE mounts) gets a warning through ``say`` and no lock.

    On S3 (``s3://``) the lock is a lease object, ``<root>/dcv.lock``, created with a conditional PUT and
    renewed while the process lives (dcv.object_store.Lease): across machines, at most one live holder;
    a holder that dies is taken over once its lease is ``LEASE_S`` old, or at once when it ran on this
    machine and its pid is gone (``say`` names it). It cannot fence a holder stalled past its lease
    (see Lease).

    What it cannot promise: other object stores (``gs://``, ...) have no lock here yet. There the lock is
    a local file named after the URI, so a second command *on the same machine* is refused, but two
    machines can write the same prefix at once; keep one writer per prefix by hand (one Ray job at a time).
    """
    if str(root).startswith("s3://") or (isinstance(root, ObjectPath) and root.scheme == "s3"):
        return _lease_storage(storage_path(root), command, say)
    path = lock_file(root)
    if path in _held:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            say(
                f"storage {root}: cannot lock {path} ({exc.strerror}); this filesystem has no file locks, "
                "so nothing stops a second dcv command from writing this root at the same time"
            )
            return path
        holder = _read_holder(path.with_name(HOLDER_FILE), wait_s=2.0)
        who = holder.describe() if holder else "another process (it has not written its holder file)"
        raise StorageInUse(
            f"storage {root} is in use by {who}; wait for it to end, or give this command another "
            "storage.root (--set storage.root=DIR)"
        ) from None
    holder_path = path.with_name(HOLDER_FILE)
    stale = _read_holder(holder_path)
    if stale is not None:
        say(f"storage {root}: taking over the lock of {stale.describe()}, which ended without releasing it")
    me = LockHolder(os.getpid(), socket.gethostname(), command, time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    with atomic_path(holder_path) as tmp:
        tmp.write_text(json.dumps(asdict(me), indent=1))
    _held[path] = fd
    atexit.register(_release, path)
    return path


def _lease_storage(root: ObjectPath, command: str, say: Callable[[str], None]) -> ObjectPath:
    """``lock_storage`` on S3: take the lease ``<root>/dcv.lock`` and renew it until this process ends."""
    path = root / LOCK_FILE
    if path in _held:
        return path
    lease = Lease(root)
    try:
        stale = lease.take(command)
    except LeaseTaken as exc:
        raise StorageInUse(
            f"storage {root} is in use by {_describe(exc.holder)}; wait for it to end, or give this command "
            f"another storage.root (--set storage.root=URI); a holder that died frees it {LEASE_S:.0f} s "
            "after its last renewal"
        ) from None
    if stale is not None:
        say(
            f"storage {root}: taking over the lock of {_describe(stale)}, which ended without releasing it "
            "(its process is gone from this machine, or its lease ran out)"
        )
    lease.keep(say)
    _held[path] = lease
    atexit.register(lease.release)
    return path


def _describe(record: dict) -> str:
    """A lease's holder record (pid, host, command, since; the renewal count left out) in words."""
    try:
        return LockHolder(*(record[k] for k in ("pid", "host", "command", "since"))).describe()
    except KeyError:
        return f"an unknown holder ({record})"


def _read_holder(path: Path, wait_s: float = 0.0) -> LockHolder | None:
    """The holder file's content; waits up to ``wait_s`` for a holder that has the lock but has not
    written the file yet (the moment between its flock and its write)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return LockHolder(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)


def _release(path: Path) -> None:
    """At exit: remove the holder file (if it is still ours), then drop the lock."""
    fd = _held.pop(path, None)
    if fd is None:
        return
    holder_path = path.with_name(HOLDER_FILE)
    holder = _read_holder(holder_path)
    if holder is not None and holder.pid == os.getpid():
        with contextlib.suppress(OSError):
            holder_path.unlink()
    os.close(fd)
