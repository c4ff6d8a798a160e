"""A full disk during a real dcv command: `dcv patch` (the tiny model, no Ray) under a file-size limit.

RLIMIT_FSIZE on the command's process stands in for a full filesystem: its writes past the limit fail
(EFBIG, as ENOSPC would on a full disk), with no root needed to mount a small tmpfs.
"""

from __future__ import annotations

import resource
import subprocess
from pathlib import Path

import pytest

from dcv.cli import patch_work
from dcv.config import load_config
from tests.helpers import DCV, fault_env

pytestmark = pytest.mark.e2e  # `dcv patch` runs without Ray

LIMIT = 512  # bytes: below any parquet table dcv writes (its schema alone is larger)


def test_a_write_on_a_full_disk_is_a_clear_error_and_leaves_no_half_file(tiny_config_file, tmp_path):
    cfg = load_config(tiny_config_file)
    [item] = patch_work(cfg, cfg.model, "ioi", "exact")  # the file dcv patch writes
    table = Path(item["path"])
    result = subprocess.run(
        [DCV, "patch", str(tiny_config_file), "--probe", "ioi"],
        cwd=tmp_path,
        env=fault_env(),
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    assert "patched 8 heads x 8 items" in result.stdout  # the work was done; only its write failed
    [message] = [line for line in result.stderr.splitlines() if line.startswith("dcv patch:")]
    assert message.startswith(
        f"dcv patch: the disk is full (or a file-size limit was hit): [Errno 27] File too large: '{table}'"
    )
    assert "no file was left half-written under its final name" in message
    assert "Traceback" not in result.stderr
    assert not table.exists()
    assert not list(table.parent.glob(f".{table.name}.tmp-*"))  # the temporary file is gone too
