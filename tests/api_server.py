"""The API as operators run it: `uvicorn service.app:app` in its own process, on a free port."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import ROOT, free_port, stop_process


def get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def get_json(url: str) -> dict:
    return json.loads(get(url)[1])


class ApiServer:
    def __init__(self, env: dict[str, str], log: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._fh = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service.app:app", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning"],
            env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT, stdout=self._fh,
            stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"uvicorn exited with {self.proc.returncode}:\n"
                                     f"{self.output()}")
            try:
                if get(f"{self.base}/healthz", timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"uvicorn did not answer within {timeout:.0f} s:\n{self.output()}")

    def stop(self) -> None:
        stop_process(self.proc, timeout=10)
        self._fh.close()


@contextmanager
def api_server(env: dict[str, str], log: Path, port: int | None = None) -> Iterator[ApiServer]:
    """Start uvicorn, wait for /healthz, stop it afterwards (even when the test fails)."""
    server = ApiServer(env, log, port)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
