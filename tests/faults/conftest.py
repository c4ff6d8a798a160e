"""The fault suite's tools: a `dcv` command run in its own session (killable with everything it started),
and the real tracking server (mlflow/serve on loopback) that a test can kill and start again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port
from tests.conftest import wait_for_no_processes as wait_for_marked

DCV = str(Path(sys.executable).with_name("dcv"))
MARKER = "DCV_TEST_FAULT_RUN"  # in the environment of every process a DcvRun starts (Ray's included)


def fault_env(**extra: str) -> dict[str, str]:
    """This environment without a cluster or tracking server of the caller's, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return {**env, **extra}


class DcvRun:
    """``dcv ARGS`` in a new session; its stdout (dcv's console lines) is read as it comes, its stderr
    goes to ``<log>``."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], log: Path):
        self.marker = uuid.uuid4().hex
        self.log = log
        self.lines: list[str] = []
        with log.open("w") as err:
            self.proc = subprocess.Popen(
                [DCV, *args],
                cwd=cwd,
                env={**env, MARKER: self.marker},
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=True,  # its own process group: a kill takes its local Ray with it
            )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def stdout(self) -> str:
        return "\n".join(self.lines)

    @property
    def stderr(self) -> str:
        return self.log.read_text()

    def saw(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def wait_for(self, ready: Callable[[], bool], seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while not ready():
            if self.proc.poll() is not None:
                pytest.fail(f"dcv exited ({self.proc.returncode}) before {what}:\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {seconds:.0f} s:\n{self.output()}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL the command, its process group and every process it started (Ray's workers run in
        sessions of their own and would otherwise finish their task first), as a lost machine would."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        wait_for_no_processes(self.marker, seconds=0)
        self.proc.wait(timeout=60)
        self._reader.join(timeout=10)
        wait_for_no_processes(self.marker, seconds=30)

    def finish(self, seconds: float) -> int:
        try:
            self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"dcv did not finish within {seconds:.0f} s:\n{self.output()}")
        self._reader.join(timeout=10)
        wait_for_no_processes(self.marker, seconds=60)
        return self.proc.returncode

    def output(self) -> str:
        return f"--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-5000:]}"


def wait_for_no_processes(value: str, seconds: float) -> None:
    """Wait until no process carries ``MARKER=value``; then SIGKILL what is left (the test started it)."""
    wait_for_marked(MARKER, value, seconds)


def stamps(paths: Iterable[Path]) -> dict[Path, int]:
    """Modification times of the files among ``paths`` (what a rerun must not rewrite)."""
    return {p: p.stat().st_mtime_ns for p in paths if p.is_file()}


def files(folder: Path, pattern: str = "*") -> list[Path]:
    """Files under ``folder`` matching ``pattern``, none set aside (``.corrupt-``) or half-written."""
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.rglob(pattern)
        if p.is_file() and ".corrupt-" not in str(p) and ".tmp-" not in p.name
    )


class TrackingServer:
    """mlflow/serve (SQLite store and artifacts in ``data``) on a loopback port; kill() and start() again
    keep the store and the port."""

    def __init__(self, data: Path):
        self.data = data
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = self.data.parent / f"{self.data.name}-{self.starts}.log"
        command = [str(REPO / "mlflow" / "serve"), "--data", str(self.data), "--port", str(self.port)]
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [*command, "--workers", "1"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 150
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow/serve exited with {self.proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow/serve not healthy after 150 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)

    def kill(self) -> None:
        """SIGKILL the server and its workers: gone at once, as a crashed host would be."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    server = TrackingServer(tmp_path_factory.mktemp("tracking-server"))
    server.start()
    try:
        yield server
    finally:
        server.kill()
