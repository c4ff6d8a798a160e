"""Object-store storage roots (``s3://``, ``gs://``, whatever ``pyarrow.fs`` resolves): paths and the lock.

``dcv.storage`` is the one filesystem interface every stage uses; for a root that is not a local folder it
hands out ``ObjectPath`` values from here. An ``ObjectPath`` has the part of ``pathlib.Path`` that dcv's
storage functions use (``/``, ``name``, ``parent``, ``with_suffix``, ``is_file``, ``read_bytes``,
``write_bytes``, ``glob``, ...) over a ``pyarrow.fs`` filesystem, so a layout helper such as
``analysis_dir(root)`` gives ``s3://bucket/run/analysis`` for an object-store root and the callers do not
change. It has no ``__fspath__``: code that would open it as a local file fails loudly instead of writing
a local folder named ``s3:``.

Where the filesystem's options come from (never from the config, which may be shared or logged):

- ``s3://bucket/prefix``: ``pyarrow.fs.S3FileSystem`` with the endpoint from ``AWS_ENDPOINT_URL_S3`` or
  ``AWS_ENDPOINT_URL`` (MinIO, moto, another S3 API) and the region from ``AWS_REGION`` or
  ``AWS_DEFAULT_REGION``; credentials from AWS's own chain (environment, ``AWS_PROFILE``, instance role).
- ``gs://bucket/prefix``: ``pyarrow.fs.GcsFileSystem`` with Google's default credentials, retrying for at
  most ``GCS_RETRY_S`` (pyarrow's default retries for 15 minutes: a machine without credentials would
  hang that long before saying so).
- anything else: ``pyarrow.fs.FileSystem.from_uri`` (``hdfs://``, ``abfs://``, ...).

What an object store promises, and how dcv's storage rules keep theirs on it:

- **Atomic writes.** An object appears whole or not at all: S3 and GCS make a PUT visible only when it has
  completed, and a multipart upload only at its CompleteMultipartUpload. So there is no temporary name
  and no rename: ``dcv.storage.atomic_path`` writes a local temporary file and sends it in one write to one
  output stream (``upload``); a process killed before the stream closes leaves no object. Reads after a
  write see it (S3 and GCS are strongly consistent for one object).
- **What it cannot promise.** A *folder* is many objects: a reader may see some of a folder being
  uploaded. A move is a copy and a delete (not atomic; dcv moves only invalid files aside). There is no
  ``flock``: the lock is a lease object (``Lease``), see there.
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from email.utils import parsedate_to_datetime
from pathlib import Path, PurePosixPath
from typing import Any

GCS_RETRY_S = 15  # how long a gs:// call retries before it fails (pyarrow's default is 15 minutes)


@dataclass(frozen=True)
class ObjectPath:
    """``<scheme>://<key>`` on a ``pyarrow.fs`` filesystem; equal when the URI is equal."""

    scheme: str
    key: str  # "bucket/prefix/name": pyarrow's path, no leading or trailing slash
    fs: Any = field(compare=False, repr=False)  # pyarrow.fs.FileSystem

    def __str__(self) -> str:
        return f"{self.scheme}://{self.key}"

    def __truediv__(self, part: str | os.PathLike) -> ObjectPath:
        return replace(self, key=f"{self.key}/{str(part).strip('/')}")

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.key).suffix

    @property
    def stem(self) -> str:
        return PurePosixPath(self.key).stem

    @property
    def parent(self) -> ObjectPath:
        return replace(self, key=str(PurePosixPath(self.key).parent))

    def with_name(self, name: str) -> ObjectPath:
        return replace(self, key=str(PurePosixPath(self.key).with_name(name)))

    def with_suffix(self, suffix: str) -> ObjectPath:
        return replace(self, key=str(PurePosixPath(self.key).with_suffix(suffix)))

    def _type(self) -> str:
        return self.fs.get_file_info(self.key).type.name  # "File", "Directory" (a prefix), "NotFound"

    def exists(self) -> bool:
        return self._type() != "NotFound"

    def is_file(self) -> bool:
        return self._type() == "File"

    def is_dir(self) -> bool:
        return self._type() == "Directory"

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: an object store has no folders, a prefix exists while it holds objects."""

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.key) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> int:
        """One write to one output stream: the object appears whole when the stream closes, or never."""
        with self.fs.open_output_stream(self.key) as f:
            f.write(data)
        return len(data)

    def write_text(self, text: str) -> int:
        return self.write_bytes(text.encode())

    def unlink(self, missing_ok: bool = False) -> None:
        if missing_ok and not self.exists():
            return
        self.fs.delete_file(self.key)

    def rename(self, target: ObjectPath) -> ObjectPath:
        """A copy then a delete (an object store has no rename): not atomic. A folder (a prefix) moves
        object by object."""
        if self._type() == "File":
            self.fs.move(self.key, target.key)
            return target
        from pyarrow.fs import FileSelector

        for info in self.fs.get_file_info(FileSelector(self.key, recursive=True)):
            if info.type.name == "File":
                self.fs.copy_file(info.path, target.key + info.path.removeprefix(self.key))
        self.fs.delete_dir(self.key)
        return target

    def iterdir(self) -> Iterator[ObjectPath]:
        from pyarrow.fs import FileSelector

        for info in self.fs.get_file_info(FileSelector(self.key, allow_not_found=True)):
            yield replace(self, key=info.path)

    def glob(self, pattern: str) -> Iterator[ObjectPath]:
        """The children whose name matches ``pattern`` (one level, as dcv's globs are)."""
        return (p for p in sorted(self.iterdir(), key=str) if fnmatch.fnmatchcase(p.name, pattern))


def object_path(uri: str) -> ObjectPath:
    """The ``ObjectPath`` of an object-store URI; a ValueError for a scheme ``pyarrow.fs`` cannot open."""
    import pyarrow.fs as pafs

    scheme, _, rest = uri.partition("://")
    key = rest.strip("/")
    if scheme == "s3":
        endpoint, region = s3_options()
        fs = pafs.S3FileSystem(endpoint_override=endpoint, region=region)
    elif scheme in ("gs", "gcs"):
        fs = pafs.GcsFileSystem(retry_time_limit=datetime.timedelta(seconds=GCS_RETRY_S))
    else:
        try:
            fs, key = pafs.FileSystem.from_uri(uri)
        except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise ValueError(f"pyarrow.fs cannot open {scheme}:// ({str(exc).splitlines()[0]})") from None
    if not key:
        raise ValueError(f"{uri} names no bucket; give <scheme>://<bucket>/<prefix>")
    return ObjectPath(scheme, key, fs)


def upload(local: Path, target: ObjectPath) -> None:
    """``local`` (a file) as the object ``target``: read whole, then one ``write`` to one output stream.

    Why it is atomic: pyarrow sends a small object as one PutObject when the stream closes, and a large
    one as a multipart upload that the store makes visible only at CompleteMultipartUpload. The whole
    file is handed over in one call, so the stream never closes on part of it: a failed upload raises (and
    pyarrow aborts the multipart upload), a killed process never completes it."""
    target.write_bytes(Path(local).read_bytes())


def upload_folder(local: Path, target: ObjectPath) -> None:
    """Every file under ``local`` to the same name under ``target``: each object atomic, the folder not."""
    for path in sorted(Path(local).rglob("*")):
        if path.is_file():
            upload(path, target / path.relative_to(local).as_posix())


def download_folder(source: ObjectPath, cache: Path) -> Path:
    """A node-local copy of the folder ``source`` under ``<cache>/storage/``, for readers that need local
    files (a model loader). Keyed by the URI and the content: the listing of its objects (``_listing``:
    name, size and, on S3, the ETag), so a folder rewritten under the same URI gets a new copy, and an
    unchanged one is downloaded once per node (a later call reads the listing only). Each object's size
    is checked against the listing; the copy is written under a temporary name and renamed, so a killed
    download leaves no folder under the final name, and of two processes downloading at once the first
    rename wins."""
    import hashlib
    import shutil
    import uuid

    listing = _listing(source)
    if not listing:
        raise FileNotFoundError(f"{source}: no objects under it")
    digest = hashlib.sha256(json.dumps([str(source), listing]).encode()).hexdigest()[:16]
    folder = Path(cache) / "storage" / f"{source.name}-{digest}"
    if folder.is_dir():
        return folder
    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        for name, size, _ in listing:
            local = tmp / name
            local.parent.mkdir(parents=True, exist_ok=True)
            with source.fs.open_input_stream(f"{source.key}/{name}") as f, open(local, "wb") as out:
                shutil.copyfileobj(f, out)
            if local.stat().st_size != size:
                raise OSError(f"{source}/{name}: downloaded {local.stat().st_size} bytes of {size}")
        try:
            tmp.rename(folder)
        except OSError:
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _listing(source: ObjectPath) -> list[tuple[str, int, str]]:
    """Every object under ``source``: (name below it, size, what identifies its content). On S3 that is
    the ETag (an MD5 of the content, or of its parts for a multipart upload), which changes when the
    content does; elsewhere pyarrow's modification time, which has the store's resolution (a rewrite of
    the same size within it would keep the key)."""
    if source.scheme == "s3":
        bucket, _, prefix = source.key.partition("/")
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
        found = [
            (o["Key"].removeprefix(f"{prefix}/"), o["Size"], o["ETag"])
            for p in pages
            for o in p.get("Contents", [])
            if not o["Key"].endswith("/")  # a folder marker (pyarrow's create_dir, Ray's uploads): no file
        ]
        return sorted(found)
    from pyarrow.fs import FileSelector

    infos = source.fs.get_file_info(FileSelector(source.key, recursive=True, allow_not_found=True))
    prefix = f"{source.key}/"
    return sorted(
        (i.path.removeprefix(prefix), i.size, str(i.mtime_ns)) for i in infos if i.type.name == "File"
    )


# The lock: a lease object.

LEASE_S = 300.0  # a holder that has not renewed its lease for this long is taken to be gone


class LeaseTaken(Exception):
    """Another process holds the lease; ``holder`` is its record (pid, host, command, since)."""

    def __init__(self, holder: dict):
        super().__init__(holder)
        self.holder = holder


@dataclass
class Lease:
    """The lock of an S3 root: the object ``<root>/dcv.lock``, created and renewed by conditional PUTs.

    How: ``take`` creates the object with ``If-None-Match: *``; S3 accepts exactly one of any number of
    concurrent creates and answers the others 412 PreconditionFailed. The object holds who holds it
    (pid, host, command, since). While held, a thread rewrites it every ``lease_s / 3`` with ``If-Match:
    <its ETag>`` (a compare-and-swap), which moves its LastModified on. A lease whose LastModified is more
    than ``lease_s`` old, by the store's own clock (the response's Date header, so the machines' clocks do
    not matter), belongs to a holder that is gone (killed, crashed, its machine lost), and so does one
    whose holder ran on this machine under a pid that no longer runs (``_died_here``): ``take`` replaces it
    with ``If-Match: <the stale ETag>``, so of two processes taking over the same stale lease one wins,
    and none wins over a renewal that came after its read (each renewal changes the ETag: ``renew``).
    ``release`` deletes it with ``If-Match``, so it never deletes another holder's lease.

    What it guarantees: at most one holder of a live lease at any time, across machines. What it cannot:
    fencing. A holder stalled for longer than ``lease_s`` (a stopped process, a partitioned machine) may
    find its lease taken over and still have writes in flight; its next renewal then fails and
    ``on_lost`` is called (dcv prints a warning naming the new holder), but writes already sent land.
    Needs boto3 (pyarrow has no conditional writes)."""

    root: ObjectPath
    lease_s: float = LEASE_S
    etag: str | None = None
    lost: bool = False
    record: dict = field(default_factory=dict)  # what the lease object holds: who, and its renewal count
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def bucket_key(self) -> tuple[str, str]:
        bucket, _, prefix = self.root.key.partition("/")
        return bucket, f"{prefix}/dcv.lock".lstrip("/")

    def take(self, command: str) -> dict | None:
        """Take the lease, or raise LeaseTaken naming the live holder. Returns the record of a stale
        holder it took over from (None when the lease was free)."""
        from botocore.exceptions import ClientError

        client, (bucket, key) = s3_client(), self.bucket_key
        self.record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "renewals": 0,
        }
        body = json.dumps(self.record, indent=1).encode()
        try:
            self.etag = client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")["ETag"]
            return None
        except ClientError as exc:
            if not _precondition_failed(exc):
                raise
        got = client.get_object(Bucket=bucket, Key=key)
        holder = _holder_record(got["Body"].read())
        now = parsedate_to_datetime(got["ResponseMetadata"]["HTTPHeaders"]["date"])
        if (now - got["LastModified"]).total_seconds() <= self.lease_s and not _died_here(holder):
            raise LeaseTaken(holder)
        try:  # stale: replace exactly the lease read, or lose to whoever replaced it first
            self.etag = client.put_object(Bucket=bucket, Key=key, Body=body, IfMatch=got["ETag"])["ETag"]
        except ClientError as exc:
            if _precondition_failed(exc):
                raise LeaseTaken(holder) from None
            raise
        return holder

    def renew(self) -> bool:
        """Rewrite the lease if it is still ours (If-Match); False (and ``lost``) when it is not.

        Each renewal counts itself in the body, so its ETag (the body's MD5) changes: a take-over whose
        If-Match names the ETag it judged stale then fails if this renewal came in between."""
        from botocore.exceptions import ClientError

        client, (bucket, key) = s3_client(), self.bucket_key
        self.record["renewals"] = self.record.get("renewals", 0) + 1
        body = json.dumps(self.record, indent=1).encode()
        try:
            self.etag = client.put_object(Bucket=bucket, Key=key, Body=body, IfMatch=self.etag)["ETag"]
            return True
        except ClientError as exc:
            if not (_precondition_failed(exc) or _not_found(exc)):
                raise
            self.lost = True
            return False

    def keep(self, on_lost: Callable[[str], None]) -> None:
        """Renew every ``lease_s / 3`` on a daemon thread until ``release``; ``on_lost`` once if taken."""

        def loop() -> None:
            while not self._stop.wait(self.lease_s / 3):
                with contextlib.suppress(Exception):  # a network blip: the next renewal tries again
                    if not self.renew():
                        on_lost(f"storage {self.root}: the lock was taken over by another process")
                        return

        threading.Thread(target=loop, name="dcv-lease", daemon=True).start()

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self._stop.set()
        if self.etag is None or self.lost:
            return
        bucket, key = self.bucket_key
        with contextlib.suppress(Exception):  # at exit: a lease left behind goes stale after lease_s
            s3_client().delete_object(Bucket=bucket, Key=key, IfMatch=self.etag)


def s3_client():
    """A boto3 S3 client with the same endpoint and region as ``object_path``'s filesystem."""
    import boto3

    endpoint, region = s3_options()
    return boto3.client("s3", endpoint_url=endpoint, region_name=region)


def s3_options() -> tuple[str | None, str | None]:
    """The S3 endpoint and region from the environment (None: the AWS default)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return endpoint, os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


def _precondition_failed(exc: Exception) -> bool:
    return getattr(exc, "response", {}).get("Error", {}).get("Code") in ("PreconditionFailed", "412")


def _not_found(exc: Exception) -> bool:
    return getattr(exc, "response", {}).get("Error", {}).get("Code") in ("NoSuchKey", "404")


def _died_here(holder: dict) -> bool:
    """The holder ran on this machine and its process is gone: a kill or crash here (the common case: a
    rerun after Ctrl-C or SIGKILL) is taken over at once rather than after ``lease_s``. A holder on
    another machine is judged by its lease's age alone."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _holder_record(body: bytes) -> dict:
    try:
        record = json.loads(body)
    except ValueError:
        record = None
    return record if isinstance(record, dict) else {"unreadable": body[:200].decode(errors="replace")}
