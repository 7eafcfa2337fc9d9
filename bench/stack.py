"""A fresh, isolated freshrec deployment for a benchmark run, started as `freshrec up` starts it.

Its own Tansu broker on a free port, a private Redis namespace, the features consumer, the
trainer and the API, each its own process under `freshrec.cli.Stack` (which restarts a child
that exits). `bench.live` and `bench.chaos` both run on it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from pathlib import Path

from freshrec.services import free_port


class BenchStack:
    """One deployment: own broker, Redis namespace, processes and ports.

    `env` adds to (or overrides) the processes' environment, e.g. a tiny encoder or a short
    publisher lease. `processes` names the children to start (the broker always starts).
    `durable_broker`: the broker keeps its log in a local S3 server (SeaweedFS, files in
    HOME/broker, as `freshrec up --durable-broker`), so it survives the broker being killed;
    else in memory."""

    PROCESSES = ("features", "trainer", "api")

    def __init__(self, home: Path, redis_url: str, env: dict[str, str] | None = None,
                 prefix: str = "live", processes: tuple[str, ...] = PROCESSES,
                 durable_broker: bool = False) -> None:
        from freshrec.cli import Stack, _wipe_namespace
        from freshrec.services import S3_BUCKET, start_s3_server

        self.home = home
        self.stack = Stack(home / "logs")
        self.kafka_port, self.api_port = free_port(), free_port()
        self.token = secrets.token_urlsafe(24)
        self.namespace = f"{prefix}-{secrets.token_hex(4)}"
        self.redis_url = redis_url
        self.env = {
            **os.environ, "PYTHONUNBUFFERED": "1",
            "FRESHREC_KAFKA_BOOTSTRAP": f"127.0.0.1:{self.kafka_port}",
            "FRESHREC_REDIS_URL": redis_url, "FRESHREC_NAMESPACE": self.namespace,
            "FRESHREC_HMAC_KEY": secrets.token_urlsafe(32), "FRESHREC_API_TOKEN": self.token,
            "FRESHREC_TRAINER_METRICS_PORT": "0", "FRESHREC_FEATURES_METRICS_PORT": "0",
            "FRESHREC_TORCH_THREADS": "1", **(env or {}),
        }
        _wipe_namespace(redis_url, self.namespace)
        self.broker_storage, self.broker_env = "memory://tansu/", {}
        if durable_broker:  # a new, empty log for every run
            shutil.rmtree(home / "broker", ignore_errors=True)
            s3, self.broker_env = start_s3_server(home / "broker", home / "logs" / "s3.log")
            self.stack.add("s3", s3)
            self.broker_storage = f"s3://{S3_BUCKET}/"
        self.stack.add("tansu", self.start_broker())
        for name in processes:
            self.stack.spawn(name, self.argv(name), self.env)
        self.base = f"http://127.0.0.1:{self.api_port}"

    def start_broker(self):  # noqa: ANN201 - subprocess.Popen
        """Tansu on this stack's port and storage, waited for (a restart after a kill too)."""
        from freshrec.services import start_tansu

        return start_tansu(self.kafka_port, self.home / "logs" / "tansu.log",
                           storage=self.broker_storage, env=self.broker_env)

    def argv(self, name: str) -> list[str]:
        """The command line of one of the processes (as `freshrec up` runs it)."""
        py = sys.executable
        if name == "api":
            return [py, "-m", "uvicorn", "service.app:app", "--host", "127.0.0.1",
                    "--port", str(self.api_port), "--log-level", "warning"]
        return [py, "-m", f"consumers.{name}"]

    def child(self, name: str):  # noqa: ANN201 - freshrec.cli.Child
        """The child process called `name` (its `proc` changes when it is restarted)."""
        return next(c for c in self.stack.children if c.name == name)

    def close(self) -> None:
        from freshrec.cli import _wipe_namespace

        self.stack.stop()
        try:
            _wipe_namespace(self.redis_url, self.namespace)
        except Exception:  # noqa: BLE001 - a Redis the run owned may be gone already
            pass
