"""The fault suite's tracking server: the real one (mlflow/serve on loopback), which a test can kill and
start again. The suite's other tools (DcvRun, fault_env, stamps, files) are in tests/helpers.py."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import REPO, free_port


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
