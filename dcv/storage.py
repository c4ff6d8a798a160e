"""Writing results so that a crash never leaves a half-written file or folder behind."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl


@contextmanager
def atomic_path(target: Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of ``target`` to write; on success it is renamed to ``target``.

    With ``replace=False`` an existing target wins (another process finished the same work first).
    """
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


def write_parquet(frame: pl.DataFrame, target: Path) -> Path:
    with atomic_path(target) as tmp:
        frame.write_parquet(tmp)
    return Path(target)


def read_parquet(path: Path) -> pl.DataFrame | None:
    """The table at ``path``, or None when it is absent or unreadable (a rerun then recomputes it)."""
    try:
        return pl.read_parquet(path)
    except (FileNotFoundError, OSError, pl.exceptions.ComputeError):
        return None
